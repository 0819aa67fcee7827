"""DeepConf's confidence measures, computed from token logprobs (pure, no I/O).

Source: Fu et al., 2025, "Deep Think with Confidence" (DeepConf).

* **Token confidence** (their eq. 2): ``C = -(1/k) * sum(log p)`` over the ``k``
  top alternatives a server returns for a token (``top_logprobs``). A peaked
  distribution puts almost all mass on one alternative, so the others have very
  negative logprobs and ``C`` is high: high means the model was sure.
* **Group confidence**: the mean ``C`` over a sliding window of ``window``
  tokens. The **lowest group** is its minimum over every window position; the
  **tail** is the mean ``C`` of the last ``window`` tokens.

Window rule for short outputs: the effective window is ``min(window, n)`` for
an output of ``n`` tokens (:func:`effective_window`), so an output shorter
than the window is one group and its lowest group and tail both equal its mean
(DeepConf's reference code does the same).

Online early stop (:class:`WindowedConfidence`, :func:`lowest_group_at`) acts
only on full windows: the first tokens of an output are too few to judge, and a
threshold set from lowest groups is only comparable with a window as wide.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

from pacore.trace import Confidence


def token_confidence(top_logprobs: Sequence[float]) -> float:
    """DeepConf's confidence of one token: the negative mean of its top alternatives' logprobs."""
    if not top_logprobs:
        raise ValueError("token confidence needs at least one alternative's logprob")
    return -sum(top_logprobs) / len(top_logprobs)


def effective_window(window: int, token_count: int) -> int:
    """The window the figures of a ``token_count``-token output use: the policy's, shortened to the output."""
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    return max(1, min(window, token_count))


class WindowedConfidence:
    """Group confidence of a growing output, updated in O(1) per token.

    Feed it each new token's confidence with :meth:`add` as a stream grows;
    :attr:`current` and :attr:`lowest` then equal the :func:`summarize` figures
    ``tail`` and ``lowest_group`` of the tokens so far (window rule included).
    """

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.window = window
        self.count = 0
        self._total = 0.0
        self._recent: deque[float] = deque(maxlen=window)
        self._recent_sum = 0.0
        self._lowest_full: float | None = None

    def add(self, values: Iterable[float]) -> None:
        """Append the confidences of newly generated tokens, in order."""
        for value in values:
            if len(self._recent) == self.window:
                self._recent_sum -= self._recent[0]
            self._recent.append(value)
            self._recent_sum += value
            self._total += value
            self.count += 1
            if self.full:
                group = self._recent_sum / self.window
                if self._lowest_full is None or group < self._lowest_full:
                    self._lowest_full = group

    @property
    def full(self) -> bool:
        """Whether a full window of tokens has been seen (early stop acts only then)."""
        return self.count >= self.window

    @property
    def mean(self) -> float | None:
        """Mean confidence of every token so far; ``None`` before the first."""
        return self._total / self.count if self.count else None

    @property
    def current(self) -> float | None:
        """Mean confidence of the last ``window`` tokens (of all of them while fewer)."""
        return self._recent_sum / len(self._recent) if self._recent else None

    @property
    def lowest(self) -> float | None:
        """Lowest group confidence so far (the mean of all tokens while fewer than a window)."""
        return self._lowest_full if self._lowest_full is not None else self.mean

    def below(self, threshold: float) -> bool:
        """Whether early stop should cut the output now: a full window whose mean is under ``threshold``."""
        current = self.current
        return self.full and current is not None and current < threshold


def summarize(confidences: Sequence[float], window: int, keep_tokens: bool = False) -> Confidence:
    """DeepConf's figures of one output's token confidences (see the module docstring for the window rule).

    ``keep_tokens`` also stores the per-token values (needed to replay early stop offline).
    """
    if not confidences:
        raise ValueError("confidence figures need at least one token")
    monitor = WindowedConfidence(effective_window(window, len(confidences)))
    monitor.add(confidences)
    # Non-empty input: every figure is set.
    assert monitor.mean is not None and monitor.lowest is not None and monitor.current is not None
    return Confidence(
        mean=monitor.mean,
        lowest_group=monitor.lowest,
        tail=monitor.current,
        window=monitor.window,
        token_count=monitor.count,
        tokens=list(confidences) if keep_tokens else None,
    )


def lowest_group_at(confidences: Sequence[float], window: int, threshold: float) -> int | None:
    """Where online early stop would have cut this output, for replaying it offline.

    Returns the index of the first token after which a full window's mean
    confidence is below ``threshold`` (the output is cut to ``confidences[: i + 1]``),
    or ``None`` if it never is: the same decision as :meth:`WindowedConfidence.below`
    checked after every token.
    """
    monitor = WindowedConfidence(window)
    for index, value in enumerate(confidences):
        monitor.add((value,))
        if monitor.below(threshold):
            return index
    return None
