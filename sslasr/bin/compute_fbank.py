"""Compute 80-dim log-mel fbank features (w2v-BERT 2.0's: SeamlessFbank) for a cut manifest
into lilcom storage.

    python -m sslasr.bin.compute_fbank --cuts IN.jsonl.gz --out-cuts OUT.jsonl.gz --storage DIR

Only fbank frontends need this; waveform frontends read audio directly in the loader.
"""

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from lhotse import CutSet, Fbank, FbankConfig, LilcomChunkyWriter
from lhotse.features.base import register_extractor
from lhotse.utils import compute_num_frames

from sslasr.data.frame_features import pad_to_one_window
from sslasr.data.loader import load_cuts
from sslasr.data.manifests import write_cuts
from sslasr.utils.io import flush_to_disk

log = logging.getLogger(__name__)


def storage_for(storage_dir, out_cuts_path) -> Path:
    """Where the features of the manifest out_cuts_path go: storage_dir/<its file name without
    .jsonl.gz>. The whole name, dots included: cutting at the first dot sent e.g.
    cuts_train_sp0.9-1.1 and cuts_train_sp0.95-1.05 to one archive, each overwriting the other."""
    name = Path(out_cuts_path).name.removesuffix(".jsonl.gz")
    if not name:
        raise ValueError(f"{out_cuts_path}: a manifest needs a name before .jsonl.gz")
    return Path(storage_dir) / name


def compute_fbank(cuts_path, out_cuts_path, storage_dir, num_mel_bins: int = 80, num_jobs: int = 2):
    with_feats = fbank_cuts(load_cuts(cuts_path), storage_for(storage_dir, out_cuts_path), num_mel_bins, num_jobs)
    write_cuts(with_feats, out_cuts_path)
    log.info("features for %d cuts -> %s", len(with_feats), out_cuts_path)
    return with_feats


@register_extractor
class SeamlessFbank(Fbank):
    """Kaldi-style log-mel fbank as w2v-BERT 2.0 was trained on (transformers'
    SeamlessM4TFeatureExtractor), so that an imported checkpoint is fine-tuned on the features it
    learnt from: mel filters up to the Nyquist frequency (Kaldi's default stops 400 Hz short,
    which moves every filter) and frames wholly inside the audio, the first one at sample 0
    (Kaldi's snip_edges; its center=False), computed on 16-bit sample values as transformers
    does: the mel energies' floor (float32 eps) is then as far below the signal as there, and
    silence or a quiet lead-in is not clamped (on [-1, 1] samples it sits 2^30 higher, and the
    clamped cells move the utterance's per-bin statistics). lhotse counts frames as
    round(duration / shift), one or two more than fit: the last frame is repeated to make up
    the count, and the loader leaves the repeats out of the utterance's length (frames_in), so
    that they count in neither the per-bin statistics nor the frame pairs, which stack as the
    checkpoint's extractor stacks them ((0, 1), (2, 3), ...). After per-bin normalisation the
    features agree with transformers' to about 1e-4. Audio shorter than one window (25 ms; evaluation splits keep every utterance) is
    zero-padded to one: Kaldi's edge frames need 10 ms or more and lhotse's extractor fails
    below that."""

    # -2: the features of this version (16-bit scale, frames aligned at the start); the first
    # version's clamped silence and stacked frames (i - 1, i): stage 2 refuses them
    name = "sslasr-seamless-fbank-2"
    SAMPLE_SCALE = 2 ** 15  # float samples to the 16-bit values transformers computes on

    def __init__(self, config: Optional[FbankConfig] = None):
        config = config or FbankConfig()
        super().__init__(dataclasses.replace(config, high_freq=0.0, snip_edges=True))

    @classmethod
    def frames_in(cls, num_samples: int, sampling_rate: int) -> int:
        """The frames computed from NUM_SAMPLES of audio, those transformers' extractor makes too
        (one for audio under a window): extract repeats the last of them to lhotse's count, and
        the loader counts these alone as the utterance's frames."""
        config = FbankConfig()
        window, shift = round(config.frame_length * sampling_rate), round(config.frame_shift * sampling_rate)
        return 1 + max(num_samples - window, 0) // shift

    def extract(self, samples, sampling_rate: int):
        num_samples = samples.shape[-1]
        wanted = compute_num_frames(num_samples / sampling_rate, self.frame_shift, sampling_rate)
        scaled = pad_to_one_window(samples, self.config.frame_length, sampling_rate) * self.SAMPLE_SCALE
        feats = super().extract(scaled, sampling_rate)
        index = np.minimum(np.arange(wanted), feats.shape[0] - 1)
        if isinstance(feats, torch.Tensor):
            index = torch.from_numpy(index).to(feats.device)
        return feats[index]

    def extract_batch(self, samples, sampling_rate: int, lengths=None):
        if lengths is not None:
            samples = [row[:int(length)] for row, length in zip(samples, lengths)]
        return [self.extract(row, sampling_rate) for row in samples]


def fbank_cuts(cuts: CutSet, storage_path: Path, num_mel_bins: int = 80, num_jobs: int = 2) -> CutSet:
    """The cuts with fbank features computed into the lilcom archive(s) at storage_path, in
    input order; cuts whose audio fails to load are left out with a warning."""
    num_in = len(cuts)
    cuts = _with_frames(cuts)
    # Several worker processes each running multi-threaded torch can deadlock (lhotse warns).
    if num_jobs > 1:
        torch.set_num_threads(1)
    Path(storage_path).parent.mkdir(parents=True, exist_ok=True)
    with_feats = cuts.compute_and_store_features(
        extractor=SeamlessFbank(FbankConfig(num_mel_bins=num_mel_bins)),
        storage_path=storage_path,
        num_jobs=num_jobs, storage_type=LilcomChunkyWriter, progress_bar=False)
    flush_to_disk()  # the archives, written without an fsync, before the manifest that points into them
    # Parallel jobs return their shards one after another: restore the input order.
    by_id = {cut.id: cut for cut in with_feats}
    with_feats = CutSet.from_cuts(by_id[cut.id] for cut in cuts if cut.id in by_id)
    # lhotse skips cuts whose audio fails to load: say so instead of losing them quietly.
    if len(with_feats) != len(cuts):
        failed = [cut.id for cut in cuts if cut.id not in by_id]
        log.warning("%d of %d cuts failed audio loading and have no features (left out): %s", len(failed), num_in,
                    ", ".join(failed[:20]) + (" ..." if len(failed) > 20 else ""))
    return with_feats


def _with_frames(cuts: CutSet) -> CutSet:
    """The cuts, each long enough for one feature frame. lhotse counts round(duration / 10 ms)
    frames and refuses features without any, so a cut under 5 ms (evaluation splits keep every
    utterance) would stop the whole split's extraction; left out, it would vanish from the
    scored set. It is padded with silence to one frame shift (its id and transcript kept; its
    features are then all the manifest holds of it), counted and named."""
    shift = FbankConfig().frame_shift
    too_short = [cut.id for cut in cuts if compute_num_frames(cut.duration, shift, cut.sampling_rate) == 0]
    if not too_short:
        return cuts
    log.warning("%d of %d cuts are shorter than half the %g ms frame shift: padded with silence to one frame: %s",
                len(too_short), len(cuts), 1000 * shift, ", ".join(too_short[:5]) + (" ..." if len(too_short) > 5 else ""))
    short = set(too_short)
    return CutSet.from_cuts(_padded(cut, shift) if cut.id in short else cut for cut in cuts)


def _padded(cut, duration: float):
    padded = cut.pad(duration=duration)
    padded.id = cut.id  # (lhotse names the padded cut afresh)
    return padded


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cuts", required=True, help="input cut manifest")
    p.add_argument("--out-cuts", required=True, help="output cut manifest with features attached")
    p.add_argument("--storage", required=True, help="folder for the lilcom feature archives")
    p.add_argument("--num-mel-bins", type=int, default=80)
    p.add_argument("--num-jobs", type=int, default=2)
    return p


def main(argv=None) -> None:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    compute_fbank(args.cuts, args.out_cuts, args.storage, args.num_mel_bins, args.num_jobs)


if __name__ == "__main__":
    main()
