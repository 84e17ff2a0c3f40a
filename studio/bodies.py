"""The JSON each POST route of the studio takes, typed: a wrong type, a missing field or an unknown one is a 400
naming it before the route runs. Field values are text, as typed on the page (numbers are taken as their text)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


class FormBody(_Body):
    """The page's form: a choice per config group and the text of each field set."""

    groups: dict[str, str] = {}
    values: dict[str, str] = {}


class DataBody(FormBody):
    """The form and how many records to show as the model sees them."""

    records: int = Field(3, ge=1, le=100)


class RunBody(_Body):
    """One run, by its dir as the runs table names it (e.g. runs/NAME)."""

    dir: str


class AskBody(RunBody):
    """A prompt to the endpoint serving a run."""

    prompt: str
    max_tokens: int = Field(48, ge=1)
