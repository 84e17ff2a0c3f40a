"""The configuration reference page (docs/reference.md), generated from the config schema each time the docs
are built, so it cannot drift from conf/schema.py.

mkdocs.yml names this file under `hooks:`; MkDocs calls `on_files`, which adds the page to the site without
writing it into docs/. The content comes from the studio's form (`lora_launch.studio.form.form`): every config
group with its choices and what each is, and every key with its type, default, range and the schema's own
comment. `python tools/docs_reference.py` prints the page.
"""

from __future__ import annotations

import json

PAGE = "reference.md"

INTRO = """\
# Configuration reference

Every key `lora-launch` takes, generated from the typed schema (`conf/schema.py`) when this site is built.
A key is set on the command line as `section.key=value` (`lora.r=16`); a config group is chosen as
`group=choice` (`distributed=zero3`). Values outside the range or of the wrong type are refused when the
config is composed, naming the key. `lora-launch --help` prints the most used keys in the terminal.
"""


def _cell(text) -> str:
    """Text that stays inside one Markdown table cell, shown as written: outside code spans a `|` would split
    the cell and a `<` open HTML (a comment's `<s>[INST]`); inside them both are literal already."""
    parts = str(text).replace("\n", " ").split("`")
    parts[::2] = [p.replace("<", "&lt;").replace("|", "\\|") for p in parts[::2]]
    return "`".join(parts)


def _default(field: dict) -> str:
    if field["set_by_group"]:
        return f"set by the `{field['section']}` choice"
    value = field["default"]
    return f"`{value}`" if isinstance(value, str) and value else f"`{json.dumps(value)}`"


def _type(field: dict) -> str:
    if field["choices"]:
        words = ", ".join(f"`{c}`" for c in field["choices"])
        return words + (", `null`" if field["nullable"] else "")
    return f"`{field['type_text']}`"


def reference_markdown() -> str:
    """The reference page: the config groups with their choices, then every key by section."""
    from lora_launch.studio.form import form

    spec = form()
    lines = [
        INTRO,
        "## Config groups",
        "",
        "Each group is a directory of YAML files under `conf/`; the choice sets the keys of its section.",
        "",
    ]
    for group in spec["groups"]:
        lines += [f"### `{group['name']}`", "", "| choice | what it is |", "|---|---|"]
        for choice in group["choices"]:
            default = " (default)" if choice == group["default"] else ""
            lines.append(f"| `{choice}`{default} | {_cell(group['help'].get(choice, ''))} |")
        lines.append("")

    lines += ["## Keys", ""]
    section = None
    for field in spec["fields"]:
        if field["section"] != section:
            section = field["section"]
            lines += [
                "",
                f"### `{section}`",
                "",
                "| key | type | default | range | what it is |",
                "|---|---|---|---|---|",
            ]
        lines.append(
            f"| `{field['key']}` | {_cell(_type(field))} | {_cell(_default(field))} | "
            f"{_cell(field['range'])} | {_cell(field['help'])} |"
        )
    return "\n".join(lines) + "\n"


def on_files(files, config):
    """MkDocs hook: add the generated reference page to the site's files."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=reference_markdown()))
    return files


if __name__ == "__main__":
    print(reference_markdown(), end="")
