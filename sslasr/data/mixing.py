"""Utterance mixing (WavLM, Chen et al. 2022): the noisy/overlapped inputs of denoising masked
speech modeling, made per training batch.

With probability p an utterance u (the primary) gets one region overlapped by an interference
v: a segment of another utterance of the same batch, or noise. The region is at most half of
u (the mixed-in part never dominates, so the primary speaker stays the one to transcribe):
    L ~ U{1 .. ⌊ρ·|u|⌋} (and ≤ |v| for speech),  s ~ U{0 .. |u| − L}
    u[s : s+L] ← u[s : s+L] + g·v[s' : s'+L],
    g = sqrt( P(u[s : s+L]) / (P(v[s' : s'+L]) · 10^(r/10)) ),  P = mean square,
so the energy ratio of primary to interference over the region is exactly r dB, with
r ~ U[−5, 5] dB for speech and U[−5, 20] dB for noise. Interfering speech comes from the
batch's *clean* audio (never from an already mixed utterance). Noise comes from a lhotse
noise cut manifest, or, without one, is synthetic coloured noise with power ∝ 1/f^β.
The targets are untouched: they stay the clean primary utterance's labels.

Deterministic: each batch's random draws come from a generator seeded by (seed, the batch's
cut ids), so a batch mixes the same way in any worker process and after resuming.
"""

import hashlib
import logging
import math
from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

log = logging.getLogger(__name__)

SILENT_POWER = 1e-10  # a region quieter than this has no level to mix relative to


@dataclass
class UtteranceMixingConfig:
    prob: float = 0.2                    # P(an utterance is mixed)
    noise_prob: float = 0.5              # P(noise rather than another utterance | mixed)
    max_region_ratio: float = 0.5        # ρ: the mixed region covers at most this part of the primary
    speech_snr_db: Tuple[float, float] = (-5.0, 5.0)   # r range, primary vs interfering speech
    noise_snr_db: Tuple[float, float] = (-5.0, 20.0)   # r range, primary vs noise
    noise_cuts: Optional[str] = None     # lhotse cut manifest of noise; None: synthetic noise
    noise_beta: Tuple[float, float] = (0.0, 2.0)       # synthetic 1/f^β, β range (0 white, 1 pink, 2 brown)

    @classmethod
    def from_dict(cls, d: Dict) -> "UtteranceMixingConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"utterance_mixing: unknown keys {unknown}; known: {', '.join(sorted(known))}")
        cfg = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for name in ("prob", "noise_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"utterance_mixing.{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.max_region_ratio <= 1.0:
            raise ValueError(f"utterance_mixing.max_region_ratio must be in (0, 1], got {self.max_region_ratio}")
        for name in ("speech_snr_db", "noise_snr_db", "noise_beta"):
            value = getattr(self, name)
            if len(value) != 2 or value[0] > value[1]:
                raise ValueError(f"utterance_mixing.{name} must be a [low, high] range, got {value}")


@dataclass
class Mix:
    """What was done to one utterance of the batch."""

    index: int           # the primary utterance in the batch
    kind: str            # "speech" or "noise"
    source: str          # the interfering cut's position in the batch, a noise cut id, or "synthetic(β=…)"
    source_offset: int   # first sample taken from the interfering utterance or noise cut
    start: int           # first mixed sample of the primary
    length: int          # mixed samples
    snr_db: float        # r: primary-to-interference energy ratio over the region
    gain: float          # g applied to the interference


class UtteranceMixer:
    """Callable on a collated waveform batch; see the module docstring."""

    def __init__(self, cfg: UtteranceMixingConfig, seed: int = 0):
        cfg.validate()
        self.cfg, self.seed = cfg, seed
        self.noise_cuts = None
        if cfg.noise_cuts:
            from lhotse import CutSet

            self.noise_cuts = list(CutSet.from_file(cfg.noise_cuts))
            if not self.noise_cuts:
                raise ValueError(f"utterance_mixing.noise_cuts {cfg.noise_cuts}: no cuts")

    def generator(self, key: str) -> torch.Generator:
        digest = hashlib.sha256(f"{self.seed}|{key}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))

    def __call__(self, audio: torch.Tensor, lengths: torch.Tensor, sampling_rate: int,
                 key: str) -> Tuple[torch.Tensor, List[Mix]]:
        """audio (B, N) zero-padded float samples, lengths (B,), key: the batch's identity (its
        cut ids) → (mixed copy of audio, one Mix per mixed utterance)."""
        gen = self.generator(key)
        clean, mixed = audio, audio.clone()
        mixes: List[Mix] = []
        batch = len(lengths)
        for i, length in enumerate(lengths.tolist()):
            if _uniform(gen) >= self.cfg.prob:
                continue
            max_region = int(length * self.cfg.max_region_ratio)
            if max_region < 1:
                continue
            use_noise = _uniform(gen) < self.cfg.noise_prob or batch == 1  # a lone utterance: noise
            if use_noise:
                region = _randint(gen, 1, max_region)
                interference, source, offset = self._noise(region, sampling_rate, gen)
                low, high = self.cfg.noise_snr_db
            else:
                j = (i + _randint(gen, 1, batch - 1)) % batch  # any other utterance of the batch
                other_length = int(lengths[j])
                region = _randint(gen, 1, min(max_region, other_length))
                offset = _randint(gen, 0, other_length - region)
                interference, source = clean[j, offset: offset + region], str(j)
                low, high = self.cfg.speech_snr_db
            start = _randint(gen, 0, length - region)
            snr_db = low + (high - low) * _uniform(gen)
            gain = _gain(clean[i, :length], clean[i, start: start + region], interference, snr_db)
            if gain is None:  # silent interference: nothing to mix
                continue
            mixed[i, start: start + region] += gain * interference.to(mixed.dtype)
            mixes.append(Mix(i, "noise" if use_noise else "speech", source, offset, start, region, snr_db, gain))
        return mixed, mixes

    def _noise(self, length: int, sampling_rate: int, gen: torch.Generator) -> Tuple[torch.Tensor, str, int]:
        """`length` samples of noise, where they come from, and their first sample there."""
        if self.noise_cuts is None:
            low, high = self.cfg.noise_beta
            beta = low + (high - low) * _uniform(gen)
            return coloured_noise(length, beta, gen), f"synthetic(beta={beta:.2f})", 0
        cut = self.noise_cuts[_randint(gen, 0, len(self.noise_cuts) - 1)]
        if cut.sampling_rate != sampling_rate:
            cut = cut.resample(sampling_rate)
        offset = _randint(gen, 0, cut.num_samples - length) if cut.num_samples > length else 0
        samples = cut.load_audio()  # (channels, samples) of the whole cut: noise clips are short
        samples = torch.from_numpy(np.ascontiguousarray(samples.mean(axis=0), dtype=np.float32))
        if len(samples) == 0:
            raise ValueError(f"noise cut {cut.id} has no samples")
        samples = samples[offset: offset + length]
        repeats = math.ceil(length / len(samples))  # a shorter noise loops
        return samples.repeat(repeats)[:length], cut.id, offset


def coloured_noise(length: int, beta: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Gaussian noise with power spectral density ∝ 1/f^β (β = 0 white, 1 pink, 2 brown):
    white noise shaped in the frequency domain by f^(−β/2), zero mean, unit power."""
    if length < 1:
        raise ValueError(f"noise length must be positive, got {length}")
    spectrum = torch.fft.rfft(torch.randn(length, generator=generator, dtype=torch.float64))
    frequency = torch.fft.rfftfreq(length, dtype=torch.float64)
    shape = torch.zeros_like(frequency)
    shape[1:] = frequency[1:] ** (-beta / 2)  # no DC: the noise has zero mean
    noise = torch.fft.irfft(spectrum * shape, n=length)
    power = noise.pow(2).mean()
    return (noise / power.sqrt() if power > 0 else noise).float()


def _gain(utterance: torch.Tensor, region: torch.Tensor, interference: torch.Tensor,
          snr_db: float) -> Optional[float]:
    """g with P(region) / P(g·interference) = 10^(snr/10). A silent region (P below
    SILENT_POWER) takes the whole utterance's power as its level; silent interference: None."""
    interference_power = float(interference.double().pow(2).mean())
    if interference_power < SILENT_POWER:
        return None
    power = float(region.double().pow(2).mean())
    if power < SILENT_POWER:
        power = float(utterance.double().pow(2).mean())
    return math.sqrt(power / (interference_power * 10.0 ** (snr_db / 10.0)))


def _uniform(gen: torch.Generator) -> float:
    return float(torch.rand((), generator=gen, dtype=torch.float64))


def _randint(gen: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high], both included."""
    return int(torch.randint(low, high + 1, (), generator=gen))


def mixing_stats(mixes: Sequence[Mix]) -> Dict[str, float]:
    """The per-batch counts the pretraining log reports."""
    noise = sum(1 for m in mixes if m.kind == "noise")
    return {"mixed_utterances": float(len(mixes)), "noise_utterances": float(noise)}


def build_mixer(cfg: Optional[Dict], seed: int = 0) -> Optional[UtteranceMixer]:
    """An UtteranceMixer from a YAML mapping (`utterance_mixing: {prob: 0.2, ...}`); None → off."""
    if cfg is None:
        return None
    return UtteranceMixer(UtteranceMixingConfig.from_dict(cfg), seed)
