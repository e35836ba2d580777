"""How far this replica's prompt counts are from what the engines prefilled, per model, over a window.

ext_proc never sees responses, so the engine's side comes from its metrics: vLLM's counter
`vllm:prompt_tokens_total` (every request's prompt tokens, counted once when it starts, cached or not;
engine_metrics.py). This replica's side: the prompt tokens of the requests it admitted to that endpoint
(counted with the tokenizer, or bounded). Both are cumulative; the gap is their ratio over the last
`window_s`, minus one: 0 when the counts are exact, 0.25 when admission counted a quarter more.

Approximate, by design: requests admitted but not started yet at either end of the window count on one
side only (a few TTFTs' worth of traffic against a minute of it), and traffic that reaches the engine
some other way (another ext_proc replica, clients around the gateway) counts on the engine's side only.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

DEFAULT_WINDOW_S = 60.0


@dataclass
class _Endpoint:
    admitted: int = 0  # prompt tokens this replica admitted here
    engine: int = 0  # prompt tokens the engine prefilled since this replica first read its counter
    last_reading: int | None = None  # the engine's counter at the last sample
    # (sample time, admitted, engine) at each sample within the window, and the last one before it.
    history: deque[tuple[float, int, int]] = field(default_factory=deque)


@dataclass(eq=False)  # a collector is registered by identity
class PromptGap(Collector):
    window_s: float = DEFAULT_WINDOW_S
    _endpoints: dict[tuple[str, str], _Endpoint] = field(default_factory=dict)

    def _at(self, model: str, endpoint: str) -> _Endpoint:
        return self._endpoints.setdefault((model, endpoint), _Endpoint())

    def admitted(self, model: str, endpoint: str, prompt_tokens: int) -> None:
        self._at(model, endpoint).admitted += prompt_tokens

    def engine_sample(self, model: str, endpoint: str, prompt_tokens: int, taken_at: float) -> None:
        """The engine's cumulative counter, read at `taken_at`. A counter below the last reading means the
        engine restarted: what it shows now is all new."""
        e = self._at(model, endpoint)
        if e.last_reading is not None:
            e.engine += prompt_tokens - e.last_reading if prompt_tokens >= e.last_reading else prompt_tokens
        e.last_reading = prompt_tokens
        e.history.append((taken_at, e.admitted, e.engine))
        while len(e.history) > 2 and e.history[1][0] <= taken_at - self.window_s:
            e.history.popleft()

    def gap(self, model: str) -> float | None:
        """Admitted over prefilled prompt tokens in the window, minus one; None until the engine has
        prefilled something in it."""
        admitted = engine = 0
        for (m, _), e in self._endpoints.items():
            if m == model and len(e.history) >= 2:
                (_, a0, e0), (_, a1, e1) = e.history[0], e.history[-1]
                admitted, engine = admitted + a1 - a0, engine + e1 - e0
        return admitted / engine - 1 if engine > 0 else None

    def collect(self) -> Iterator[Metric]:
        admitted = CounterMetricFamily("kvgate_prompt_tokens_admitted", "Prompt tokens of the requests this "
                                       "replica admitted, as admission counted them", labels=["model", "endpoint"])
        engine = CounterMetricFamily("kvgate_engine_prompt_tokens", "Prompt tokens the engine reports it "
                                     "prefilled (vllm:prompt_tokens_total), since this replica first read it",
                                     labels=["model", "endpoint"])
        gap = GaugeMetricFamily("kvgate_prompt_tokens_gap_ratio", f"Admitted over engine-prefilled prompt tokens "
                                f"in the last {self.window_s:g} s, minus one (0: counted exactly; approximate)",
                                labels=["model"])
        for (model, endpoint), e in sorted(self._endpoints.items()):
            admitted.add_metric([model, endpoint], e.admitted)
            if e.last_reading is not None:
                engine.add_metric([model, endpoint], e.engine)
        for model in sorted({m for m, _ in self._endpoints}):
            if (value := self.gap(model)) is not None:
                gap.add_metric([model], value)
        yield admitted
        yield engine
        yield gap
