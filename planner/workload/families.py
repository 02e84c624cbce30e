"""Seeded synthetic length families tuned to published facts (REFERENCE §9).

``byted-like``, ``github-like``, ``lognormal:median=600,sigma=1.2``, ``longalign-like`` and
``prolong-like`` are each a mixture of simple laws. Every family carries its facts as :class:`Fact`
values with the tolerance we hold it to; the tests check them on a large seeded sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import count
from typing import Any, Callable, Iterator, Literal, Union

import numpy as np

from planner.workload.errors import SourceError
from planner.workload.tokens import K_TOKENS, M_TOKENS, MAX_LENGTH_TOKENS, format_tokens, parse_tokens

DEFAULT_SAMPLES = 1_000_000  # synthetic sample size for `describe` (enough for 0.05% facts)
BLOCK_DOCUMENTS = 1 << 16  # synthetic streams are drawn in fixed blocks, so prefixes are stable


def _phi(z: float) -> float:
    """Standard normal CDF."""
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


@dataclass(frozen=True)
class LogNormal:
    """Log-normal lengths truncated to [lo_tokens, hi_tokens) (redrawn outside)."""

    median_tokens: float  # exp(μ)
    sigma: float  # σ of ln length
    lo_tokens: float = 1.0
    hi_tokens: float = float(MAX_LENGTH_TOKENS)

    def _z(self, x: float, shift: float = 0.0) -> float:
        return (math.log(x) - math.log(self.median_tokens) - shift) / self.sigma

    def _mass(self, shift: float = 0.0) -> float:
        return _phi(self._z(self.hi_tokens, shift)) - _phi(self._z(self.lo_tokens, shift))

    def cdf(self, x: float) -> float:
        """Share of samples below x: Φ((ln x − μ)/σ), renormalised to the truncation."""
        x = min(max(x, self.lo_tokens), self.hi_tokens)
        return (_phi(self._z(x)) - _phi(self._z(self.lo_tokens))) / self._mass()

    def token_cdf(self, x: float) -> float:
        """Share of tokens in samples below x: the token-weighted law is log-normal with μ + σ²."""
        s2 = self.sigma ** 2
        x = min(max(x, self.lo_tokens), self.hi_tokens)
        return (_phi(self._z(x, s2)) - _phi(self._z(self.lo_tokens, s2))) / self._mass(s2)

    def mean_tokens(self) -> float:
        return self.median_tokens * math.exp(self.sigma ** 2 / 2) * self._mass(self.sigma ** 2) / self._mass()

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self._mass() < 1e-3:  # rejection would spin; say which parameters are impossible
            raise SourceError(f"log-normal median={self.median_tokens:g}, sigma={self.sigma:g} puts under 0.1% "
                              f"of samples in [{self.lo_tokens:g}, {self.hi_tokens:g}) tokens")
        mu = math.log(self.median_tokens)
        x = rng.lognormal(mu, self.sigma, n)
        bad = (x < self.lo_tokens) | (x >= self.hi_tokens)
        while bad.any():
            x[bad] = rng.lognormal(mu, self.sigma, int(bad.sum()))
            bad = (x < self.lo_tokens) | (x >= self.hi_tokens)
        return x


@dataclass(frozen=True)
class PowerLaw:
    """Density ∝ s^-(alpha+1) on [lo_tokens, hi_tokens); alpha = 0 is log-uniform."""

    lo_tokens: float
    hi_tokens: float
    alpha: float

    def mean_tokens(self) -> float:
        lo, hi, a = self.lo_tokens, self.hi_tokens, self.alpha
        if a == 0:
            return (hi - lo) / math.log(hi / lo)
        if a == 1:
            return math.log(hi / lo) / (1 / lo - 1 / hi)
        return a / (a - 1) * (lo ** (1 - a) - hi ** (1 - a)) / (lo ** -a - hi ** -a)

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        u = rng.random(n)  # inverse CDF
        lo, hi, a = self.lo_tokens, self.hi_tokens, self.alpha
        if a == 0:
            return lo * (hi / lo) ** u
        return (lo ** -a - u * (lo ** -a - hi ** -a)) ** (-1.0 / a)


@dataclass(frozen=True)
class Fixed:
    """Every sample exactly `tokens` long (e.g. documents concatenated to fill a window)."""

    tokens: int

    def mean_tokens(self) -> float:
        return float(self.tokens)

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.full(n, float(self.tokens))


Component = Union[LogNormal, PowerLaw, Fixed]


@dataclass(frozen=True)
class Mixture:
    """Each sample comes from a component picked with its share of samples; lengths are floored to
    whole tokens, so [lo, hi) laws give integers in [lo, hi − 1]."""

    parts: tuple[tuple[float, Component], ...]  # (share of samples, component)

    @staticmethod
    def by_token_share(parts: tuple[tuple[float, Component], ...]) -> "Mixture":
        """Mixture whose components carry the given shares of tokens: sample weight ∝ share / mean."""
        raw = [(share / c.mean_tokens(), c) for share, c in parts]
        total = sum(w for w, _ in raw)
        return Mixture(tuple((w / total, c) for w, c in raw))

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        weights = np.array([w for w, _ in self.parts])
        which = rng.choice(len(self.parts), size=n, p=weights / weights.sum())
        x = np.empty(n)
        for j, (_, component) in enumerate(self.parts):
            mask = which == j
            x[mask] = component.draw(rng, int(mask.sum()))
        return np.maximum(np.floor(x), 1).astype(np.int64)


@dataclass(frozen=True)
class Fact:
    """A published statistic a synthetic family reproduces: the share of samples (or of tokens) in
    lengths lo_tokens ≤ s ≤ hi_tokens lies in [low, high]."""

    claim: str  # the statistic as published, e.g. "≈80% of samples ≤ 4K"
    ref: str  # where it is published
    weight: Literal["samples", "tokens"]
    lo_tokens: int
    hi_tokens: int  # inclusive
    low: float  # accepted share range (the tolerance we hold the family to)
    high: float

    def measure(self, lengths_tokens: np.ndarray) -> float:
        s = np.asarray(lengths_tokens, dtype=np.int64)
        inside = (s >= self.lo_tokens) & (s <= self.hi_tokens)
        if self.weight == "samples":
            return float(inside.mean())
        return float(s[inside].sum() / s.sum())

    def holds(self, lengths_tokens: np.ndarray) -> bool:
        return self.low <= self.measure(lengths_tokens) <= self.high


def _about(claim: str, ref: str, weight: Literal["samples", "tokens"], lo: int, hi: int, target: float,
           tol: float) -> Fact:
    return Fact(claim, ref, weight, lo, hi, max(target - tol, 0.0), min(target + tol, 1.0))


_NO_LIMIT = 2 * MAX_LENGTH_TOKENS  # upper end of fact ranges with no upper bound


@dataclass(frozen=True)
class SyntheticSource:
    """A seeded synthetic length distribution: a mixture of simple laws and the facts it meets."""

    name: str  # canonical spec, e.g. "lognormal:median=600,sigma=1.2"
    mixture: Mixture
    facts: tuple[Fact, ...]
    summary: str  # one line: what it models

    @property
    def steps(self) -> None:
        return None  # synthetic streams are cut into steps by a token budget

    def _block(self, seed: int, index: int) -> np.ndarray:
        # Each block has its own generator, so a stream's prefix does not depend on how much is drawn.
        return self.mixture.draw(np.random.default_rng([seed, index]), BLOCK_DOCUMENTS)

    def sample(self, n: int | None = None, seed: int = 0) -> np.ndarray:
        """n lengths (DEFAULT_SAMPLES when None): the first n of documents(seed)."""
        n = DEFAULT_SAMPLES if n is None else int(n)
        if n < 1 or seed < 0:
            raise SourceError(f"{self.name}: samples must be ≥ 1 and seed ≥ 0 (got {n}, {seed})")
        blocks = [self._block(seed, i) for i in range(-(-n // BLOCK_DOCUMENTS))]
        return np.concatenate(blocks)[:n]

    def documents(self, seed: int) -> Iterator[np.ndarray]:
        if seed < 0:
            raise SourceError(f"{self.name}: seed must be ≥ 0, got {seed}")
        for i in count():
            yield self._block(seed, i)


BYTESCALE = "ByteScale §3.1, Fig. 4"
DE_VRIES = "de Vries (harmdevries.com)"


def byted_like() -> SyntheticSource:
    """ByteScale's production ("Byted") pre-training mix, up to 2M tokens.

    Published facts met (REFERENCE §9) [ByteScale §3.1, Fig. 4], with our tolerances:
      ≈80% of samples ≤ 4K (±1 pp); the 1% of samples ≥ 128K (±0.1 pp) carry 44.3% of tokens
      (±1.5 pp); 0.05% of samples (±0.01 pp) are at 2M and carry 12.1% of tokens (±1.5 pp); 37% of
      tokens are in samples > 256K (±1.5 pp). Mean ≈ 8.67K tokens (= 0.05% · 2M / 12.1%).
    Shape [assumption]: 84.6% web-like log-normal (median 600, σ 1.2, < 128K); 14.4% power law on
    [4K, 128K) (α 0.365, sets the 55.7% of tokens below 128K); 0.33% log-uniform on [128K, 256K)
    (7.3% of tokens); 0.62% power law on [256K, 2M) (α 3.94, 24.9% of tokens); 0.05% at exactly 2M.
    The weights and exponents were solved from the facts above with the closed-form means.
    Not met: the tentative per-bucket token shares (2M 12.1, 1M 9.7, 512K 7.3, 256K 8.8,
    128K 6.4%) [unverified figure decoding]: they imply only 0.68% of samples ≥ 128K, not 1%.
    """
    mixture = Mixture((
        (0.846309, LogNormal(600, 1.2, hi_tokens=128 * K_TOKENS)),
        (0.143691, PowerLaw(4 * K_TOKENS, 128 * K_TOKENS, 0.36539)),
        (0.0033454, PowerLaw(128 * K_TOKENS, 256 * K_TOKENS, 0.0)),
        (0.0061546, PowerLaw(256 * K_TOKENS, 2 * M_TOKENS, 3.94085)),
        (0.0005, Fixed(2 * M_TOKENS)),
    ))
    facts = (
        _about("≈80% of samples ≤ 4K", BYTESCALE, "samples", 1, 4 * K_TOKENS, 0.80, 0.01),
        _about("1% of samples ≥ 128K", BYTESCALE, "samples", 128 * K_TOKENS, _NO_LIMIT, 0.01, 0.001),
        _about("samples ≥ 128K carry 44.3% of tokens", BYTESCALE, "tokens", 128 * K_TOKENS, _NO_LIMIT, 0.443, 0.015),
        _about("0.05% of samples at 2M", BYTESCALE, "samples", 2 * M_TOKENS, 2 * M_TOKENS, 0.0005, 0.0001),
        _about("samples at 2M carry 12.1% of tokens", BYTESCALE, "tokens", 2 * M_TOKENS, 2 * M_TOKENS, 0.121, 0.015),
        _about("37% of tokens in samples > 256K", BYTESCALE, "tokens", 256 * K_TOKENS + 1, _NO_LIMIT, 0.37, 0.015),
    )
    return SyntheticSource("byted-like", mixture, facts, "ByteScale production pre-training mix up to 2M")


def github_like() -> SyntheticSource:
    """ByteScale's GitHub (code) mix: short files with a heavy tail of long repository documents.

    Published facts met (REFERENCE §9): 16.2% of tokens in samples > 128K (±1.5 pp) and 9.8% in
    samples > 256K (±1.5 pp) [ByteScale §3.1]; over ~80% of code documents shorter than 2K
    (accepted 80–90%) [de Vries].
    Shape [assumption]: code-like log-normal (median 400, σ 1.6, < 128K; REFERENCE §9 table) plus
    a power law on [128K, 2M) (α 1.516, so 9.8/16.2 of its tokens lie above 256K) carrying 16.2%
    of tokens (≈0.09% of samples). The median is not published; only the tail is pinned.
    """
    mixture = Mixture.by_token_share((
        (0.838, LogNormal(400, 1.6, hi_tokens=128 * K_TOKENS)),
        (0.162, PowerLaw(128 * K_TOKENS, 2 * M_TOKENS, 1.51551)),
    ))
    facts = (
        _about("16.2% of tokens in samples > 128K", BYTESCALE, "tokens", 128 * K_TOKENS + 1, _NO_LIMIT, 0.162, 0.015),
        _about("9.8% of tokens in samples > 256K", BYTESCALE, "tokens", 256 * K_TOKENS + 1, _NO_LIMIT, 0.098, 0.015),
        Fact("over ~80% of documents < 2K", DE_VRIES, "samples", 1, 2 * K_TOKENS - 1, 0.80, 0.90),
    )
    return SyntheticSource("github-like", mixture, facts, "ByteScale GitHub code mix")


def lognormal(median_tokens: int = 600, sigma: float = 1.2, max_tokens: int = MAX_LENGTH_TOKENS) -> SyntheticSource:
    """Log-normal lengths (spec "lognormal:median=600,sigma=1.2,max=2M"): median `median_tokens`,
    σ `sigma` of ln length, truncated below `max_tokens`
    (default: the web-like set of REFERENCE §9, which meets de Vries' "over ~80% of documents
    < 2K" with 84.7%).

    Facts met are the closed forms of REFERENCE §9 (truncation included): samples ≤ L =
    Φ((ln L − μ)/σ) for L = the median (50%) and L = 2K (±0.5 pp); tokens in samples ≤ 2K =
    Φ((ln L − μ − σ²)/σ) (±1 pp). Lengths are floored to whole tokens, so "≤ L" is "< L + 1".
    """
    median, max_ = median_tokens, max_tokens
    if not (median >= 1 and 0 < sigma <= 10 and median < max_ <= MAX_LENGTH_TOKENS):
        raise SourceError(f"lognormal: need median ≥ 1, 0 < sigma ≤ 10 and median < max ≤ "
                          f"{format_tokens(MAX_LENGTH_TOKENS)} (got median={median}, sigma={sigma}, max={max_})")
    law = LogNormal(float(median), float(sigma), hi_tokens=float(max_))
    ref = "REFERENCE §9 closed forms"
    facts = (
        _about(f"50% of samples ≤ the median {median}", ref, "samples", 1, median, law.cdf(median + 1), 0.005),
        _about(f"samples ≤ 2K: Φ((ln 2K − μ)/σ) = {law.cdf(2 * K_TOKENS + 1):.1%}", ref, "samples", 1,
               2 * K_TOKENS, law.cdf(2 * K_TOKENS + 1), 0.005),
        _about(f"tokens in samples ≤ 2K: Φ((ln 2K − μ − σ²)/σ) = {law.token_cdf(2 * K_TOKENS + 1):.1%}", ref,
               "tokens", 1, 2 * K_TOKENS, law.token_cdf(2 * K_TOKENS + 1), 0.01),
    )
    name = f"lognormal:median={median},sigma={sigma:g}" + ("" if max_ == MAX_LENGTH_TOKENS else f",max={max_}")
    return SyntheticSource(name, Mixture(((1.0, law),)), facts, f"log-normal, median {median}, σ {sigma:g}")


LONGALIGN = "LongAlign-10k (arXiv 2401.18058)"


def longalign_like(long_share: float = 0.5) -> SyntheticSource:
    """A LongAlign-style SFT mix: LongAlign-10k's long instructions (8K–64K tokens) mixed with short
    ShareGPT chats.

    Published facts met (REFERENCE §9) [LongAlign; dataset card]: the long part spans 8K–64K tokens,
    so `long_share` of samples (default 50% [assumption: equal counts], ±1 pp) lie in [8K, 64K]
    and none is longer than 64K.
    Shape [assumption]: log-uniform on [8K, 64K) for the long part; ShareGPT-like log-normal
    (median 500, σ 1.0, < 8K) for the chats.
    """
    if not 0 < long_share < 1:
        raise SourceError(f"longalign-like: long_share must be in (0, 1), got {long_share}")
    mixture = Mixture((
        (1 - long_share, LogNormal(500, 1.0, hi_tokens=8 * K_TOKENS)),
        (long_share, PowerLaw(8 * K_TOKENS, 64 * K_TOKENS, 0.0)),
    ))
    facts = (
        _about(f"{long_share:.0%} of samples are 8K–64K long instructions", LONGALIGN, "samples",
               8 * K_TOKENS, 64 * K_TOKENS, long_share, 0.01),
        Fact("no sample longer than 64K", LONGALIGN, "samples", 64 * K_TOKENS + 1, _NO_LIMIT, 0.0, 0.0),
    )
    name = "longalign-like" + ("" if long_share == 0.5 else f":long_share={long_share:g}")
    return SyntheticSource(name, mixture, facts, "LongAlign-10k long SFT + ShareGPT chats")


PROLONG = "ProLong (arXiv 2410.02660) [unverified %]"


def prolong_like(pack_tokens: int = 64 * K_TOKENS) -> SyntheticSource:
    """A ProLong-style continued pre-training mix: code repositories, books and textbooks
    concatenated to fill the packing window, plus short data.

    Published facts met (REFERENCE §9) [ProLong; percentages unverified]: 63% of tokens
    (30% code repos + 30% books + 3% textbooks, ±1 pp) are in documents of exactly the packing
    length (64K in the first stage, `pack=512K` for the second); the rest is short data; no
    document exceeds the window.
    Shape [assumption]: short data web-like log-normal (median 600, σ 1.2, < pack).
    """
    pack = pack_tokens
    if pack < 4 * K_TOKENS:
        raise SourceError(f"prolong-like: pack must be at least 4K tokens, got {pack}")
    mixture = Mixture.by_token_share((
        (0.37, LogNormal(600, 1.2, hi_tokens=pack)),
        (0.63, Fixed(pack)),
    ))
    facts = (
        _about(f"63% of tokens in documents packed to {format_tokens(pack)}", PROLONG, "tokens", pack, pack,
               0.63, 0.01),
        Fact(f"no document longer than {format_tokens(pack)}", PROLONG, "samples", pack + 1, _NO_LIMIT, 0.0, 0.0),
    )
    name = "prolong-like" + ("" if pack == 64 * K_TOKENS else f":pack={format_tokens(pack)}")
    return SyntheticSource(name, mixture, facts, f"ProLong continued pre-training mix packed at {format_tokens(pack)}")


# family name -> (constructor, {spec parameter: (keyword argument, parser)})
FAMILIES: dict[str, tuple[Callable[..., SyntheticSource], dict[str, tuple[str, Callable[[str], Any]]]]] = {
    "byted-like": (byted_like, {}),
    "github-like": (github_like, {}),
    "lognormal": (lognormal, {"median": ("median_tokens", parse_tokens), "sigma": ("sigma", float),
                              "max": ("max_tokens", parse_tokens)}),
    "longalign-like": (longalign_like, {"long_share": ("long_share", float)}),
    "prolong-like": (prolong_like, {"pack": ("pack_tokens", parse_tokens)}),
}


def synthetic_source(spec: str) -> SyntheticSource:
    """A family from its spec: "name" or "name:key=value,..." (parameters as in FAMILIES)."""
    family, _, params = spec.partition(":")
    make, parsers = FAMILIES[family]
    kwargs: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in params.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in parsers:
            known = ", ".join(parsers) or "none"
            raise SourceError(f"{family}: cannot read parameter {item!r} (parameters: {known}; e.g. "
                              "lognormal:median=600,sigma=1.2)")
        keyword, parse = parsers[key]
        try:
            kwargs[keyword] = parse(value.strip())
        except ValueError as e:  # SourceError from parse_tokens is a ValueError too
            raise SourceError(f"{family}: parameter {key}={value.strip()!r} is not a valid number") from e
    return make(**kwargs)
