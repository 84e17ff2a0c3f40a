"""Generation for the server: one base model, every adapter loaded beside it, requests batched across adapters.

Requests wait in one queue, oldest first. A worker thread takes the oldest and every other waiting request that
decodes the same way (greedy, or sampled with the same temperature and top_p), whatever adapter each asks for,
up to `max_batch`, and generates them as one batch: PEFT applies each row's own adapter to that row
(`adapter_names=`), the base model's rows get none. Each request's text goes back to it token by token as the
batch makes it (streaming), and a row that is done (end of sequence, its max_tokens, a stop string, its client
gone) stops there while the others go on. A request arriving during a batch waits for the next one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch

from lora_launch.conf.errors import UserError
from lora_launch.serve.adapters import Served
from lora_launch.train.posttrain import device

BASE = "__base__"  # PEFT's name for the rows of a mixed batch that take no adapter
GATHER_S = 0.005  # after idling, wait this long for requests sent together to share the first batch
log = logging.getLogger("lora_launch.serve")


@dataclass(eq=False)
class Job:
    """One request's generation: its prompt ids, adapter and limits; what it made so far."""

    ids: list[int]
    adapter: str  # the engine's adapter id, or BASE
    max_new: int
    sampling: tuple = ()  # (): greedy; (temperature, top_p), and a seed (such a request is batched alone)
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none asked; k: each token's log-probability and its k likeliest rivals
    emit: Callable[[str, str | None], None] = lambda text, finish: None  # (new text, finish reason or None)
    tokens: list[int] = field(default_factory=list)
    token_logprobs: list[tuple[str, float, list[tuple[str, float]]]] = field(default_factory=list)  # per token
    sent: str = ""  # the text emitted so far
    finish: str | None = None  # stop | length | error | cancelled
    cancelled: bool = False

    def key(self) -> tuple:
        """Requests with the same key can share a batch."""
        return self.sampling if len(self.sampling) < 3 else (id(self),)


class Engine:
    """The model, its tokenizer and the worker thread that generates batches."""

    def __init__(self, model, tok, adapter_ids: dict[str, str], max_batch: int):
        self.model, self.tok, self.max_batch = model, tok, max_batch
        self.adapter_ids = adapter_ids  # served name -> the adapter's id inside the PeftModel (BASE for the base)
        self.mixed = any(a != BASE for a in adapter_ids.values())
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        eos = model.generation_config.eos_token_id
        self.eos_ids = {tok.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        self.context = getattr(model.config, "max_position_embeddings", None)
        self._pending: deque[Job] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self.active = 0  # requests queued or being generated
        self.batches = 0  # how many batches were generated, and how many rows they had in all
        self.rows = 0
        self._thread = threading.Thread(target=self._work, name="generate", daemon=True)
        self._thread.start()

    # ---- the event loop's side --------------------------------------------------------------------

    def start(self, jobs: list[Job]) -> list[asyncio.Queue]:
        """Queue the jobs together; each one's (new text, finish reason or None) pairs arrive on its queue."""
        loop, queues = asyncio.get_running_loop(), []
        for job in jobs:
            queue = asyncio.Queue()
            job.emit = lambda text, finish, queue=queue: loop.call_soon_threadsafe(queue.put_nowait, (text, finish))
            queues.append(queue)
        with self._wake:
            self.active += len(jobs)
            self._pending.extend(jobs)
            self._wake.notify()
        return queues

    @staticmethod
    async def stream(job: Job, queue: asyncio.Queue) -> AsyncIterator[tuple[str, str | None]]:
        """The started job's pairs as the batch makes them; the last one has the finish reason."""
        try:
            while True:
                text, finish = await queue.get()
                yield text, finish
                if finish is not None:
                    return
        finally:
            job.cancelled = True  # a client gone before the end frees its row; no effect after the end

    @classmethod
    async def complete(cls, job: Job, queue: asyncio.Queue) -> tuple[str, str]:
        """The started job's whole text and finish reason."""
        parts, finish = [], None
        async for text, reason in cls.stream(job, queue):
            parts.append(text)
            finish = reason
        return "".join(parts), finish

    def close(self) -> None:
        """Finish what is queued, then stop the worker."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()

    # ---- the worker's side ------------------------------------------------------------------------

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self._generate(batch)
            except Exception:  # noqa: BLE001 - a failed batch answers its requests with an error; serving goes on
                log.exception("generation failed for a batch of %d", len(batch))
                for job in batch:
                    if job.finish is None:
                        self._end(job, "error")

    def _next_batch(self) -> list[Job] | None:
        """The oldest waiting request and the others that decode as it does, up to max_batch; None: closed."""
        with self._wake:
            idle = not self._pending
            while not self._pending and not self._closing:
                self._wake.wait()
            if not self._pending:
                return None
        if idle:
            time.sleep(GATHER_S)
        with self._wake:
            live = [j for j in self._pending if not j.cancelled]
            for job in self._pending:
                if job.cancelled:  # its client went away while it waited
                    job.finish = "cancelled"
                    self.active -= 1
            if not live:
                self._pending.clear()
                return []
            key = live[0].key()
            batch = [j for j in live if j.key() == key][: self.max_batch]
            taken = set(map(id, batch))
            self._pending = deque(j for j in live if id(j) not in taken)
            return batch

    @torch.inference_mode()
    def _generate(self, batch: list[Job]) -> None:
        if not batch:
            return
        from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

        class Done(StoppingCriteria):  # a row stops when its request is done, the others go on
            def __call__(self, input_ids, scores, **kwargs):
                return torch.tensor([j.finish is not None for j in batch], device=input_ids.device)

        logprobs = _LogProbs() if any(j.logprobs is not None for j in batch) else None
        width = max(len(j.ids) for j in batch)
        rows = [[self.pad_id] * (width - len(j.ids)) + j.ids for j in batch]  # left-padded
        mask = [[0] * (width - len(j.ids)) + [1] * len(j.ids) for j in batch]
        dev = self.model.device
        kwargs = dict(
            max_new_tokens=max(j.max_new for j in batch),
            pad_token_id=self.pad_id,
            use_cache=True,
            streamer=_Rows(self, batch, logprobs),
            stopping_criteria=StoppingCriteriaList([Done()]),
        )
        if logprobs is not None:
            kwargs["logits_processor"] = LogitsProcessorList([logprobs])
        sampling = batch[0].sampling
        if sampling:
            kwargs.update(do_sample=True, temperature=sampling[0], top_p=sampling[1], top_k=0)
            if len(sampling) == 3:
                torch.manual_seed(sampling[2])
        else:
            kwargs.update(do_sample=False)
        if self.mixed:
            kwargs["adapter_names"] = [j.adapter for j in batch]
        self.batches, self.rows = self.batches + 1, self.rows + len(batch)
        self.model.generate(
            input_ids=torch.tensor(rows, device=dev), attention_mask=torch.tensor(mask, device=dev), **kwargs
        )
        for job in batch:
            if job.finish is None:  # the batch ended at its longest request's max_tokens
                self._finish(job, "length")

    def _advance(self, job: Job, token: int, dist: torch.Tensor | None = None) -> None:
        """One new token of a request: emit the text it completes, and finish the request where it ends;
        `dist`: the row's log-probabilities this step, for a request that asked for them."""
        if job.cancelled:
            return self._end(job, "cancelled")
        if token in self.eos_ids:
            return self._finish(job, "stop")
        job.tokens.append(token)
        text = self.tok.decode(job.tokens, skip_special_tokens=True)
        if job.logprobs is not None and dist is not None:
            self._record_logprobs(job, dist, text)
        cut = min((i for i in (text.find(s) for s in job.stop) if i >= 0), default=-1)
        if cut >= 0:
            return self._finish(job, "stop", text[:cut])
        if len(job.tokens) >= job.max_new:
            return self._finish(job, "length", text)
        # hold back what may be half a character, or the start of a stop string
        keep = len(text) - max((len(s) - 1 for s in job.stop), default=0)
        while keep > 0 and text[keep - 1] == "\ufffd":
            keep -= 1
        if keep > len(job.sent) and text.startswith(job.sent):
            job.emit(text[len(job.sent) : keep], None)
            job.sent = text[:keep]

    def _record_logprobs(self, job: Job, dist: torch.Tensor, text: str) -> None:
        """The new token's text and log-probability, and its likeliest rivals' (each token's text is what it
        adds to the answer, so that the tokens put together read as the answer)."""
        before_ids = job.tokens[:-1]
        before = self.tok.decode(before_ids, skip_special_tokens=True)
        top = dist.topk(job.logprobs) if job.logprobs else None
        rivals = (
            []
            if top is None
            else [
                (self.tok.decode(before_ids + [i], skip_special_tokens=True)[len(before) :], value)
                for value, i in zip(top.values.tolist(), top.indices.tolist())
            ]
        )
        job.token_logprobs.append((text[len(before) :], float(dist[job.tokens[-1]]), rivals))

    def _finish(self, job: Job, reason: str, text: str | None = None) -> None:
        if text is None:
            text = self.tok.decode(job.tokens, skip_special_tokens=True)
        rest = text[len(job.sent) :] if text.startswith(job.sent) else ""
        job.sent += rest
        self._end(job, reason, rest)

    def _end(self, job: Job, reason: str, text: str = "") -> None:
        with self._wake:
            job.finish = reason
            self.active -= 1
        if reason != "cancelled":
            job.emit(text, reason)


class _LogProbs:
    """A logits processor that keeps each step's log-probabilities of every row (before temperature and top_p:
    the model's own, as OpenAI reports them) and changes nothing."""

    last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # -9999 for a token ruled out (-inf), as vLLM reports it: JSON has no -Infinity
        self.last = scores.float().log_softmax(-1).clamp(min=-9999.0).cpu()
        return scores


class _Rows:
    """generate()'s streamer: the prompts first, then each step's new token of every row."""

    def __init__(self, engine: Engine, batch: list[Job], logprobs: _LogProbs | None = None):
        self.engine, self.batch, self.logprobs, self.prompts_seen = engine, batch, logprobs, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompts_seen:
            self.prompts_seen = True
            return
        dists = self.logprobs.last if self.logprobs is not None else None
        for row, (job, token) in enumerate(zip(self.batch, value.reshape(-1).tolist())):
            if job.finish is None:
                self.engine._advance(job, token, dists[row] if dists is not None else None)

    def end(self) -> None:
        pass


def load_engine(served: Served, max_batch: int) -> Engine:
    """The base model with every adapter loaded beside it (PEFT ids a0, a1, ...), ready to generate."""
    from transformers import AutoTokenizer

    base = _load_base(served)
    base.config.use_cache = True
    model, ids = base, {served.base_name: BASE}
    for i, adapter in enumerate(served.adapters):
        ids[adapter.name] = f"a{i}"  # PEFT's names become module keys: no `.` (trial names have them)
        try:
            if i == 0:
                from peft import PeftModel

                model = PeftModel.from_pretrained(base, adapter.path, adapter_name="a0")
            else:
                model.load_adapter(adapter.path, adapter_name=f"a{i}")
        except Exception as e:  # noqa: BLE001 - a broken adapter dir is one line naming it
            raise UserError(
                f"{adapter.path}: cannot load this adapter onto {served.base} ({type(e).__name__}: {_first_line(e)})"
            ) from None
    model.eval()
    first_run = next((a.run for a in served.adapters if a.run is not None and (a.run / "adapter").is_dir()), None)
    tok = AutoTokenizer.from_pretrained(first_run / "adapter" if first_run else served.base)
    return Engine(model, tok, ids, max_batch)


def _load_base(served: Served):
    """The base as the runs trained on it (their quantisation and dtype), or as saved when no run says."""
    try:
        if served.base_cfg is not None:
            from lora_launch.train.model import load_base_model

            return load_base_model(served.base_cfg, device())
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(
            served.base, dtype="auto", use_safetensors=True, trust_remote_code=False
        ).to(device())
    except (OSError, ValueError) as e:
        raise UserError(f"base={served.base}: cannot load the model ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
