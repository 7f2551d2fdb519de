"""One thread owns the model; concurrent requests share its forward passes.

Every use of the model by the server goes through here and through `eclip.match.Matcher`
(encode_pixels / encode_texts / scores) and the gallery functions, so the server follows
whatever engine Matcher runs.

Requests decode and resize their images on their own threads (PIL only), then hand a `Job`
(resized images, captions, and a `finish` function that turns features into the answer) to
the model thread. That thread takes every job waiting, and while other requests are still
being read and decoded (`arrive()` counts them) it waits for them up to `max_wait` seconds:
requests arriving together become one batch, a lone request is never held back. All torch
work (the tensor stage of preprocessing, the forward, the scores) happens on the model
thread, so the model is never used by two requests at once and torch keeps one OpenMP team.

`eclip serve` runs that loop on the main thread (`run()`) and uvicorn on another: torch's
OpenMP (libgomp) spins its team's idle threads only while it manages no more threads than
there are cores, and a second thread starting parallel regions (a model thread beside the
main one) pushes it past that on a small machine, where every forward pass then paid the
wake-up of sleeping threads: 1.4x the main thread's time on 2 cores (bench/bench_serve.py).
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

DEFAULT_MAX_WAIT = 0.010     # seconds the model thread waits for requests still arriving
DEFAULT_MAX_IMAGES = 32      # images encoded in one forward pass at most (one job may exceed it alone)


@dataclass
class Job:
    images: list                       # PIL images after the image stage of the model's transform
    texts: list[str]
    finish: Callable                   # finish(image_features, text_features) -> the answer (model thread)
    future: Future = field(default_factory=Future)


class Batcher:
    """Collects jobs into batches for one model thread. Thread-safe; start() before use."""

    def __init__(self, matcher, max_wait: float = DEFAULT_MAX_WAIT, max_images: int = DEFAULT_MAX_IMAGES):
        self.matcher = matcher
        self.max_wait, self.max_images = max_wait, max_images
        self.image_stage, self._tensor_stage = matcher.preprocess_stages()
        self._cond = threading.Condition()
        self._jobs: list[Job] = []
        self._arriving = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="eclip-serve-model", daemon=True)
        self.stats = {"jobs": 0, "batches": 0, "largest_batch": 0, "busy_s": 0.0}

    def start(self) -> "Batcher":
        """The model loop on a thread of its own."""
        self._thread.start()
        return self

    def run(self) -> None:
        """The model loop on the calling thread, until stop() (instead of start())."""
        self._run()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the jobs already queued, then end the model thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def arrive(self) -> "Arrival":
        """Announce a request that will submit a job soon (used as a context manager)."""
        with self._cond:
            self._arriving += 1
        return Arrival(self)

    def _submit(self, job: Job) -> Future:
        with self._cond:
            if self._stopping:
                job.future.set_exception(RuntimeError("the server is shutting down"))
            else:
                self._jobs.append(job)
            self._arriving -= 1
            self._cond.notify_all()
        return job.future

    def _leave(self) -> None:
        with self._cond:
            self._arriving -= 1
            self._cond.notify_all()

    # ---- the model thread ----

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._jobs and not self._stopping:
                self._cond.wait()
            if not self._jobs:
                return None
            deadline = time.monotonic() + self.max_wait
            while self._arriving and sum(len(j.images) for j in self._jobs) < self.max_images:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, size = [], 0
            while self._jobs and (not batch or size + len(self._jobs[0].images) <= self.max_images):
                size += len(self._jobs[0].images)
                batch.append(self._jobs.pop(0))
            return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            self.stats["batches"] += 1
            self.stats["jobs"] += len(batch)
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
            start = time.perf_counter()
            self._encode(batch)
            self.stats["busy_s"] += time.perf_counter() - start

    def _encode(self, batch: list[Job]) -> None:
        pixels, good = [], []
        for job in batch:
            try:
                job_pixels = [self._tensor_stage(image) for image in job.images]
            except Exception as e:   # one odd image fails its own request only
                job.future.set_exception(e)
                continue
            pixels += job_pixels
            good.append(job)
        try:
            images = self.matcher.encode_pixels(pixels)
            texts = self.matcher.encode_texts([t for job in good for t in job.texts])
        except Exception as e:   # e.g. out of memory: these requests fail, the server goes on
            for job in good:
                job.future.set_exception(e)
            return
        i = t = 0
        for job in good:
            ni, nt = len(job.images), len(job.texts)
            try:
                job.future.set_result(job.finish(images[i:i + ni], texts[t:t + nt]))
            except Exception as e:
                job.future.set_exception(e)
            i, t = i + ni, t + nt


class Arrival:
    """A request being read: the model thread may wait for it. submit() once, or leave on exit."""

    def __init__(self, batcher: Batcher):
        self._batcher, self._open = batcher, True

    def submit(self, images: list, texts: list[str], finish: Callable) -> Future:
        if not self._open:
            raise RuntimeError("this arrival already submitted its job")
        self._open = False
        return self._batcher._submit(Job(images, texts, finish))

    def __enter__(self) -> "Arrival":
        return self

    def __exit__(self, *exc) -> None:
        if self._open:
            self._open = False
            self._batcher._leave()
