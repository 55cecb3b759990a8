"""minisynth: a small synthetic English corpus, synthesised offline with espeak-ng.

It is the project's demo/CI corpus: clean enough for a tiny CPU model to learn in minutes,
varied enough (16 voices, random rate/pitch/gain/silence, coloured noise) to be a real
test. Everything is deterministic from ``seed``: sentences come from a seeded grammar, and
each utterance draws its acoustic choices from a Generator seeded by (seed, split, index),
so the number of worker processes never changes the result.

Splits (Kaldi layout, like /work/shared/data/speechocean762):
  train/      wav.scp text utt2spk            labeled pool, TRAIN_VOICES
  unlabeled/  wav.scp text.reference utt2spk  audio-only pool for SSL, TRAIN_VOICES
  dev/        wav.scp text utt2spk            DEV_VOICES + TRAIN_VOICES (model selection)
  test/       wav.scp text utt2spk            TEST_VOICES only (accent + variant pairs of no other
                                              split; a variant sets the timbre, and f4 and klatt's
                                              are heard in training with other accents, m5's nowhere)
Sentence strings are unique across all splits, so test sentences never occur elsewhere;
the vocabulary is shared.

CLI: python -m sslasr.data.minisynth --out-dir DIR [--seed 0] [--num-train N] ...
"""

import argparse
import hashlib
import io
import json
import logging
import multiprocessing
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import soundfile as sf

from sslasr.utils.io import atomic_path, remove_temp_files, write_text_atomic

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
GENERATOR_VERSION = 1  # bump when the synthesis recipe changes, so old output is redone
SPLITS = ("test", "dev", "train", "unlabeled")  # sentence-drawing order: test reserves first
SPLIT_CODES = {"train": 1, "unlabeled": 2, "dev": 3, "test": 4}

# Voices are espeak-ng language voice + variant. Held-out voices recombine accents and
# variants that do occur in training, so they are new speakers but not out of domain.
TRAIN_VOICES = (
    "en-us+m1", "en-us+f2", "en-us+klatt", "en-gb-x-rp+m3", "en-gb-x-rp+f1",
    "en+m7", "en+f4", "en-029+m2", "en-029+f3", "en-gb-scotland+m4", "en-gb-x-gbclan+f5",
)
DEV_VOICES = ("en-us-nyc+m6", "en-gb-x-gbcwmd+f2")
TEST_VOICES = ("en-us+m5", "en-gb-x-rp+f4", "en-029+klatt")
RATE_WPM = (140, 190)
PITCH = (30, 70)

# ---------------------------------------------------------------------------------------
# Grammar: templates per domain; "{slot}" is replaced by a random entry of SLOTS[slot],
# and entries may themselves contain slots (e.g. a time is "{hour} {minute}").
# ---------------------------------------------------------------------------------------
TEMPLATES: Dict[str, List[str]] = {
    "home": [
        "turn {onoff} the {room} {device}", "please turn {onoff} the {device} in the {room}",
        "set the {room} temperature to {teen} degrees {when}",
        "{dim} the {room} lights to {count} percent", "{openclose} the {room} {opening} {when}",
        "is the {device} in the {room} still on", "switch the {room} {device} to {mode} mode",
        "lock the {room} {opening} before {time}",
    ],
    "alarm": [
        "set an alarm for {time}", "wake me up at {time} {daypart}",
        "set a timer for {count} {unit} to {chore}", "remind me to {chore} at {time}",
        "remind me to {chore} on {day} {daypart}", "cancel the alarm for {time}",
        "the meeting is on {day} at {time}", "the {transport} leaves at {time} {daypart}",
    ],
    "numbers": [
        "{digit} {digit} {digit} {digit}",
        "my number is {digit} {digit} {digit} {digit} {digit}",
        "the code is {digit} {digit} {digit}", "i need {count} {objects} for the {event}",
        "there are {count} {animals} in the {outdoor}", "add {count} and {count}",
        "page {count} of the {adjective} book", "my birthday is on the {ordinal} of {month}",
    ],
    "places": [
        "the {building} is next to the {adjective} {landmark}",
        "turn {leftright} at the {adjective} {landmark}",
        "go {direction} for {count} {distance}", "how do i get to the {building} in {city}",
        "the {building} is {prep} the {landmark}",
        "where is the nearest {building} to the {landmark}",
        "we met at the {building} in {city}", "take the {transport} to {city} on {day}",
    ],
    "describe": [
        "a {size} {colour} {vehicle}", "the {animal} is {size} and {colour}",
        "the weather is {weather} and {weather} today", "it will be {weather} in {city} {when}",
        "{name} has a {size} {colour} {object}", "she bought a {colour} {clothing} {when}",
        "the {adjective} {animal} sleeps under the {furniture}",
        "the {colour} {clothing} is too {size}",
    ],
    "daily": [
        "add {food} and {food} to the shopping list", "i would like {count} {fruits} please",
        "we need {food} and {food} for {meal}", "{name} is going to the {building} on {day}",
        "my {relative} likes to {activity} in the {season}",
        "play some {genre} music in the {room}", "turn the {room} volume {updown} to {count}",
        "call {name} {when}", "what time does the {building} in {city} open",
        "can you {activity} with me {when}", "{name} works as a {job} in {city}",
    ],
}

SLOTS: Dict[str, List[str]] = {
    # home
    "onoff": ["on", "off"], "dim": ["dim", "brighten"], "openclose": ["open", "close"],
    "updown": ["up", "down"], "mode": ["eco", "quiet", "turbo", "night", "auto"],
    "room": ["kitchen", "bedroom", "bathroom", "garage", "office", "hallway", "basement",
             "attic", "garden", "living room", "dining room", "guest room", "laundry room"],
    "device": ["lights", "heater", "fan", "radio", "television", "oven", "kettle", "printer",
               "computer", "speaker", "lamp", "dishwasher", "washing machine", "air conditioner",
               "coffee maker", "vacuum cleaner"],
    "opening": ["door", "window", "curtains", "blinds", "gate", "shutters"],
    "furniture": ["table", "chair", "sofa", "bed", "desk", "bench", "shelf", "cupboard"],
    # time
    "time": ["{hour} {minute}", "{hour} {minute}", "half past {hour}", "quarter past {hour}",
             "quarter to {hour}", "{hour} sharp", "noon", "midnight"],
    "hour": ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
             "eleven", "twelve"],
    "minute": ["fifteen", "twenty", "thirty", "forty", "forty five", "fifty", "ten", "five"],
    "daypart": ["in the morning", "in the afternoon", "in the evening", "at night", "tomorrow"],
    "day": ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"],
    "when": ["today", "tomorrow", "tonight", "yesterday", "next week", "this weekend",
             "last month", "later", "soon", "every day"],
    "month": ["january", "february", "march", "april", "may", "june", "july", "august",
              "september", "october", "november", "december"],
    "season": ["spring", "summer", "autumn", "winter"],
    "unit": ["seconds", "minutes", "hours"],
    "chore": ["buy milk", "call the doctor", "water the plants", "feed the cat", "pay the rent",
              "take out the trash", "walk the dog", "clean the kitchen", "send the letter",
              "book a table", "pick up the kids", "fix the bike", "wash the car", "read the news"],
    # numbers
    "digit": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
    "count": ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
              "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
              "nineteen", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty",
              "ninety", "one hundred", "twenty five", "sixty two", "eighty seven"],
    "teen": ["sixteen", "seventeen", "eighteen", "nineteen", "twenty", "twenty one",
             "twenty two", "twenty three", "twenty four", "twenty five"],
    "ordinal": ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth",
                "ninth", "tenth", "eleventh", "twelfth", "fifteenth", "twentieth",
                "twenty first", "thirtieth"],
    "event": ["party", "wedding", "picnic", "meeting", "concert", "festival", "lesson"],
    # places
    "building": ["museum", "library", "hospital", "school", "station", "bank", "bakery",
                 "pharmacy", "cinema", "theatre", "hotel", "restaurant", "market", "church",
                 "post office", "police station", "supermarket", "airport", "stadium",
                 "swimming pool"],
    "landmark": ["bridge", "river", "park", "fountain", "tower", "square", "statue", "harbour",
                 "lake", "forest", "roundabout", "crossing", "corner", "hill", "garden"],
    "outdoor": ["field", "forest", "garden", "park", "yard", "barn", "meadow", "zoo", "valley"],
    "prep": ["behind", "near", "opposite", "across from", "beside", "far from", "close to"],
    "leftright": ["left", "right"],
    "direction": ["north", "south", "east", "west", "straight ahead", "back"],
    "distance": ["miles", "meters", "kilometers", "blocks", "minutes"],
    "city": ["london", "paris", "berlin", "madrid", "rome", "tokyo", "boston", "chicago",
             "denver", "sydney", "toronto", "dublin", "vienna", "lisbon", "prague", "seattle"],
    "transport": ["train", "bus", "ferry", "plane", "tram", "taxi", "boat", "subway"],
    # descriptions
    "size": ["small", "big", "large", "tiny", "huge", "long", "short", "tall", "little",
             "wide", "narrow"],
    "colour": ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "brown",
               "pink", "grey", "silver", "golden", "dark"],
    "adjective": ["old", "new", "quiet", "busy", "famous", "lovely", "strange", "beautiful",
                  "clean", "dirty", "modern", "ancient", "empty", "crowded", "happy",
                  "hungry", "friendly", "funny"],
    "vehicle": ["car", "truck", "bicycle", "motorbike", "van", "bus", "tractor", "boat",
                "scooter", "helicopter", "sailboat", "caravan"],
    "animal": ["dog", "cat", "horse", "cow", "sheep", "pig", "goat", "rabbit", "mouse", "bird",
               "duck", "chicken", "fox", "bear", "lion", "tiger", "monkey", "elephant",
               "frog", "owl"],
    "weather": ["cold", "warm", "hot", "windy", "sunny", "cloudy", "rainy", "foggy", "dry",
                "wet", "stormy", "mild", "freezing", "humid", "snowy"],
    "object": ["cup", "plate", "spoon", "knife", "fork", "bottle", "glass", "bag", "box",
               "basket", "book", "pen", "phone", "ticket", "key", "ball", "umbrella", "watch"],
    "clothing": ["hat", "coat", "jacket", "scarf", "shirt", "dress", "skirt", "sweater",
                 "jumper", "glove", "boot", "shoe", "belt", "tie", "raincoat"],
    # daily life
    "food": ["bread", "butter", "cheese", "milk", "eggs", "rice", "pasta", "soup", "salad",
             "chicken", "fish", "beef", "sugar", "salt", "honey", "coffee", "tea", "juice",
             "potatoes", "carrots", "tomatoes", "cake", "chocolate", "pizza"],
    # plurals for "{count} ..." phrases (listed, since English plurals are irregular)
    "objects": ["cups", "plates", "spoons", "knives", "forks", "bottles", "glasses", "bags",
                "boxes", "books", "pens", "tickets", "keys", "candles", "chairs", "tables"],
    "animals": ["dogs", "cats", "horses", "cows", "sheep", "pigs", "goats", "rabbits", "mice",
                "birds", "ducks", "chickens", "foxes", "wolves", "geese", "deer", "owls"],
    "fruits": ["apples", "bananas", "oranges", "lemons", "pears", "peaches", "plums", "mangoes",
               "melons", "cherries", "grapes", "kiwis"],
    "meal": ["breakfast", "lunch", "dinner", "supper", "the picnic"],
    "name": ["anna", "david", "maria", "james", "sarah", "peter", "emma", "thomas", "laura",
             "michael", "sophie", "daniel", "lucy", "robert", "alice", "george", "helen",
             "julia", "oliver", "paul"],
    "relative": ["mother", "father", "sister", "brother", "aunt", "uncle", "cousin",
                 "grandmother", "grandfather", "friend", "neighbour", "teacher", "son",
                 "daughter", "wife", "husband"],
    "activity": ["swim", "read", "dance", "sing", "cook", "paint", "run", "ski", "fish",
                 "travel", "garden", "cycle", "skate", "draw", "hike", "play chess",
                 "play tennis", "play football", "ride horses", "walk"],
    "genre": ["jazz", "rock", "classical", "country", "pop", "folk", "blues", "piano",
              "guitar", "dance", "relaxing", "quiet"],
    "job": ["doctor", "nurse", "teacher", "driver", "farmer", "baker", "pilot", "singer",
            "writer", "painter", "builder", "chef"],
}

_SLOT_RE = re.compile(r"\{(\w+)\}")
MIN_WORDS, MAX_WORDS = 3, 10


def expand(template: str, rng: np.random.Generator) -> str:
    """Fill every {slot} (recursively) with a random entry of its word list."""
    while True:
        match = _SLOT_RE.search(template)
        if match is None:
            return template
        options = SLOTS[match.group(1)]
        choice = options[rng.integers(len(options))]
        template = template[: match.start()] + choice + template[match.end():]


def grammar_vocabulary() -> Set[str]:
    """Every word the grammar can produce (upper-case, as in the transcripts)."""
    texts = [t for ts in TEMPLATES.values() for t in ts] + [v for vs in SLOTS.values() for v in vs]
    return {w.upper() for t in texts for w in _SLOT_RE.sub(" ", t).split()}


def capacity(template: str) -> int:
    """How many sentences a template can yield (an upper bound: expansions may coincide).

    Templates with a small capacity would be used up by the first split drawn (test), and
    their words would then never occur in train; tests keep every template large.
    """
    count = 1
    for slot in _SLOT_RE.findall(template):
        count *= sum(capacity(option) for option in SLOTS[slot])
    return count


def sample_sentence(rng: np.random.Generator) -> str:
    """One random sentence: pick a domain uniformly (so no domain dominates), then a template."""
    domain = list(TEMPLATES)[rng.integers(len(TEMPLATES))]
    templates = TEMPLATES[domain]
    return expand(templates[rng.integers(len(templates))], rng).upper()


def draw_sentences(seed: int, split: str, num: int, taken: Set[str]) -> List[str]:
    """`num` distinct sentences not in `taken` (which is updated), from a per-split stream."""
    rng = np.random.default_rng([seed, SPLIT_CODES[split], 0])
    sentences: List[str] = []
    for _ in range(200 * num + 1000):
        if len(sentences) == num:
            return sentences
        sentence = sample_sentence(rng)
        if sentence not in taken and MIN_WORDS <= len(sentence.split()) <= MAX_WORDS:
            taken.add(sentence)
            sentences.append(sentence)
    raise RuntimeError(f"grammar ran out of unique sentences for {split} ({num} requested)")


# ---------------------------------------------------------------------------------------
# Per-utterance synthesis
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UttSpec:
    """Everything that determines one utterance's audio (its hash keys the resume logic)."""

    utt_id: str
    speaker: str
    text: str
    voice: str
    rate: int
    pitch: int
    noise: str  # "none", "white", "pink" or "brown"
    snr_db: float
    gain_db: float  # peak level of the final audio, dBFS
    lead_s: float
    trail_s: float
    noise_seed: Tuple[int, ...]


def speaker_id(voice: str) -> str:
    """'en-gb-x-rp+f1' -> 'engbxrp_f1' (no '+', '-' so Kaldi ids stay simple)."""
    lang, variant = voice.split("+")
    return f"{lang.replace('-', '')}_{variant}"


def voices_for(split: str) -> Sequence[str]:
    return {"train": TRAIN_VOICES, "unlabeled": TRAIN_VOICES, "test": TEST_VOICES,
            "dev": DEV_VOICES + TRAIN_VOICES}[split]


def make_specs(seed: int, split: str, sentences: List[str], noise_prob: float,
               snr_range: Tuple[float, float]) -> List[UttSpec]:
    voices = voices_for(split)
    specs = []
    for index, text in enumerate(sentences):
        rng = np.random.default_rng([seed, SPLIT_CODES[split], 1, index])
        voice = voices[index % len(voices)]  # round-robin: every voice present even when tiny
        spk = speaker_id(voice)
        # Draw every value unconditionally, so changing noise_prob changes nothing else.
        rate = int(rng.integers(RATE_WPM[0], RATE_WPM[1] + 1))
        pitch = int(rng.integers(PITCH[0], PITCH[1] + 1))
        noisy = bool(rng.random() < noise_prob)
        noise = str(rng.choice(["white", "pink", "brown"]))
        snr_db = round(float(rng.uniform(*snr_range)), 2)
        specs.append(UttSpec(
            utt_id=f"{spk}-{split}-{index:06d}", speaker=spk, text=text, voice=voice,
            rate=rate, pitch=pitch, noise=noise if noisy else "none",
            snr_db=snr_db if noisy else 0.0, gain_db=round(float(rng.uniform(-12.0, -1.0)), 2),
            # espeak already ends with ~0.2-0.35 s of silence, so trailing padding is short.
            lead_s=round(float(rng.uniform(0.05, 0.3)), 3),
            trail_s=round(float(rng.uniform(0.0, 0.1)), 3),
            noise_seed=(seed, SPLIT_CODES[split], 2, index)))
    return specs


def fft_friendly(n: int) -> int:
    """Smallest 2^a * 3^b * 5^c >= n: pocketfft is slow on lengths with large prime factors."""
    best = 1 << max(0, n - 1).bit_length()
    p3 = 1
    while p3 < best:
        p35 = p3
        while p35 < best:
            p2 = p35
            while p2 < n:
                p2 *= 2
            best = min(best, p2)
            p35 *= 5
        p3 *= 3
    return best


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited FFT resampling (as scipy.signal.resample): drop bins above the new Nyquist.

    Zero-padding to (sr_in/gcd) * an FFT-friendly factor makes the output length an exact
    integer (no drift) and keeps the FFTs fast; espeak output starts and ends in silence,
    so the circular edges are harmless.
    """
    g = int(np.gcd(sr_in, sr_out))
    up, down = sr_out // g, sr_in // g
    padded_len = down * fft_friendly(-(-len(x) // down))
    spectrum = np.fft.rfft(x.astype(np.float32), n=padded_len)
    out_len = padded_len // down * up
    y = np.fft.irfft(spectrum[: out_len // 2 + 1], n=out_len) * (out_len / padded_len)
    return y[: round(len(x) * up / down)]


def coloured_noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS white (flat), pink (1/f power) or brown (1/f^2 power) noise of length n."""
    n_fft = fft_friendly(n)
    spectrum = np.fft.rfft(rng.standard_normal(n_fft, dtype=np.float32))
    freqs = np.maximum(np.fft.rfftfreq(n_fft), 1.0 / n_fft).astype(np.float32)
    exponent = {"white": 0.0, "pink": 0.5, "brown": 1.0}[kind]
    noise = np.fft.irfft(spectrum / freqs ** exponent, n=n_fft)[:n]
    noise -= noise.mean()
    return noise / (np.sqrt(np.mean(noise ** 2)) + 1e-12)


def run_espeak(text: str, voice: str, rate: int, pitch: int) -> Tuple[np.ndarray, int]:
    cmd = ["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout", text.lower()]
    wav = subprocess.run(cmd, check=True, capture_output=True).stdout
    audio, sr = sf.read(io.BytesIO(wav), dtype="float32")
    if audio.size == 0:
        raise RuntimeError(f"espeak-ng produced no audio for {cmd}")
    return audio, sr


def render(spec: UttSpec) -> np.ndarray:
    """Synthesise, resample to 16 kHz, pad with silence, add noise, set level."""
    audio, sr = run_espeak(spec.text, spec.voice, spec.rate, spec.pitch)
    speech = resample(audio, sr, SAMPLE_RATE)
    speech_rms = np.sqrt(np.mean(speech ** 2))  # before padding: SNR is relative to speech
    x = np.concatenate([np.zeros(int(spec.lead_s * SAMPLE_RATE), np.float32), speech,
                        np.zeros(int(spec.trail_s * SAMPLE_RATE), np.float32)])
    if spec.noise != "none":
        rng = np.random.default_rng(list(spec.noise_seed))
        x = x + coloured_noise(spec.noise, len(x), rng) * speech_rms * 10 ** (-spec.snr_db / 20)
    x *= 10 ** (spec.gain_db / 20) / (np.max(np.abs(x)) + 1e-9)
    return x.astype(np.float32)


def _synthesize_one(job: Tuple[UttSpec, str]) -> Tuple[str, int]:
    """Pool worker: write one FLAC atomically (skipped if already there); return its length."""
    spec, path = job
    if not Path(path).exists():  # atomic writes: an existing file is a complete file
        with atomic_path(path) as tmp:
            sf.write(tmp, render(spec), SAMPLE_RATE, subtype="PCM_16", format="FLAC")
    return spec.utt_id, sf.info(path).frames


# ---------------------------------------------------------------------------------------
# Corpus assembly
# ---------------------------------------------------------------------------------------
def espeak_version() -> str:
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("minisynth needs the `espeak-ng` program on PATH "
                           "(e.g. `apt-get install espeak-ng`)")
    out = subprocess.run(["espeak-ng", "--version"], check=True, capture_output=True, text=True)
    return out.stdout.split("Data at")[0].strip()


def specs_hash(specs: List[UttSpec], version: str) -> str:
    payload = json.dumps([GENERATOR_VERSION, version, [asdict(s) for s in specs]])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def write_split(split_dir: Path, split: str, specs: List[UttSpec], pool, version: str) -> float:
    """Write audio + Kaldi files for one split, resuming earlier work; return total seconds."""
    digest = specs_hash(specs, version)
    done_marker = split_dir / ".done"
    done = json.loads(done_marker.read_text()) if done_marker.exists() else {}
    if done.get("hash") == digest:
        logger.info("%s: already complete, skipping", split)
        return done["seconds"]
    # Audio from other options/seed would be silently reused by name: remove it first.
    spec_file = split_dir / ".spec_hash"
    if spec_file.exists() and spec_file.read_text() != digest:
        logger.info("%s: options changed, removing old audio", split)
        shutil.rmtree(split_dir / "audio", ignore_errors=True)
        done_marker.unlink(missing_ok=True)
    write_text_atomic(spec_file, digest)
    for speaker_dir in (split_dir / "audio").glob("*/"):  # temporary files of a killed run
        remove_temp_files(speaker_dir, "*")

    jobs = [(s, str(split_dir / "audio" / s.speaker / f"{s.utt_id}.flac")) for s in specs]
    for spk in {s.speaker for s in specs}:
        (split_dir / "audio" / spk).mkdir(parents=True, exist_ok=True)
    frames: Dict[str, int] = {}
    start = time.time()
    for i, (utt_id, n) in enumerate(pool.imap_unordered(_synthesize_one, jobs, chunksize=8), 1):
        frames[utt_id] = n
        if i % 500 == 0 or i == len(jobs):
            logger.info("%s: %d/%d utterances (%.1fs)", split, i, len(jobs), time.time() - start)

    ordered = sorted(specs, key=lambda s: s.utt_id)  # Kaldi wants C-sorted ids
    # Unlabeled keeps its transcript under another name so no trainer reads it by accident.
    text_name = "text.reference" if split == "unlabeled" else "text"
    lines = {
        "wav.scp": [f"{s.utt_id} audio/{s.speaker}/{s.utt_id}.flac" for s in ordered],
        "utt2spk": [f"{s.utt_id} {s.speaker}" for s in ordered],
        text_name: [f"{s.utt_id} {s.text}" for s in ordered],
    }
    for name, content in lines.items():
        write_text_atomic(split_dir / name, "\n".join(content) + "\n")
    seconds = sum(frames.values()) / SAMPLE_RATE
    write_text_atomic(done_marker, json.dumps({"hash": digest, "seconds": seconds}))
    logger.info("%s: %d utterances, %.1f minutes of audio", split, len(specs), seconds / 60)
    return seconds


def generate_corpus(out_dir, *, seed: int = 0, num_train: int = 1500, num_unlabeled: int = 3000,
                    num_dev: int = 200, num_test: int = 300, num_jobs: int = 2,
                    noise_prob: float = 0.3, snr_range: Tuple[float, float] = (10.0, 30.0)) -> dict:
    """Generate (or resume) the corpus under out_dir; return the info also saved as info.json."""
    version = espeak_version()
    out_dir = Path(out_dir)
    sizes = {"train": num_train, "unlabeled": num_unlabeled, "dev": num_dev, "test": num_test}
    taken: Set[str] = set()
    specs = {}
    for split in SPLITS:  # test first, so its sentences do not depend on the other sizes
        sentences = draw_sentences(seed, split, sizes[split], taken)
        specs[split] = make_specs(seed, split, sentences, noise_prob, tuple(snr_range))

    seconds = {}
    with multiprocessing.Pool(max(1, num_jobs)) as pool:
        for split in ("train", "unlabeled", "dev", "test"):
            seconds[split] = write_split(out_dir / split, split, specs[split], pool, version)

    info = {
        "corpus": "minisynth", "generator_version": GENERATOR_VERSION, "espeak_ng": version,
        "seed": seed, "sizes": sizes, "sample_rate": SAMPLE_RATE,
        "noise_prob": noise_prob, "snr_db_range": list(snr_range),
        "rate_wpm_range": list(RATE_WPM), "pitch_range": list(PITCH),
        "voices": {split: list(voices_for(split)) for split in sizes},
        "seconds": {split: round(s, 2) for split, s in seconds.items()},
        "hours_total": round(sum(seconds.values()) / 3600, 3),
        "grammar_vocabulary_size": len(grammar_vocabulary()),
    }
    write_text_atomic(out_dir / "info.json", json.dumps(info, indent=2) + "\n")
    return info


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=1500)
    parser.add_argument("--num-unlabeled", type=int, default=3000)
    parser.add_argument("--num-dev", type=int, default=200)
    parser.add_argument("--num-test", type=int, default=300)
    parser.add_argument("--num-jobs", type=int, default=2)
    parser.add_argument("--noise-prob", type=float, default=0.3)
    parser.add_argument("--snr-range", type=float, nargs=2, default=(10.0, 30.0))
    args = parser.parse_args(argv)
    small = [f"--num-{name} {getattr(args, 'num_' + name)}" for name in ("train", "unlabeled", "dev", "test")
             if getattr(args, "num_" + name) < 1]
    if small:  # an empty split folder would stop stage 1 with a puzzle ("wav.scp lists no utterances")
        parser.error(f"every split needs at least one utterance: {', '.join(small)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    info = generate_corpus(args.out_dir, seed=args.seed, num_train=args.num_train,
                           num_unlabeled=args.num_unlabeled, num_dev=args.num_dev,
                           num_test=args.num_test, num_jobs=args.num_jobs,
                           noise_prob=args.noise_prob, snr_range=tuple(args.snr_range))
    logger.info("done: %s", json.dumps(info["seconds"]))


if __name__ == "__main__":
    main()
