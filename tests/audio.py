"""Helpers shared by the audio tests: word comparison and WAV header checks."""

from __future__ import annotations

import difflib
import re
import struct

SENTENCE = "Please turn on the kitchen lights and set a timer for ten minutes."

_NUMBERS = {"10": "ten"}


def assert_heard(
    text: str, expected: str = SENTENCE, at_least: float = 0.9, what: str = ""
) -> None:
    """``text`` is what Whisper made of ``expected``, allowing one misheard word in 13.

    Piper draws random noise for each synthesis (its noise_scale), so the same sentence sounds a
    little different every time, and whisper-tiny now and then hears "place" for "please". An
    exact match would fail at random; a wrong format, an empty or a foreign text still fails."""
    got, want = normalise(text), normalise(expected)
    ratio = difflib.SequenceMatcher(a=got, b=want).ratio()
    assert ratio >= at_least, f"{what} heard {got}, expected {want} (similarity {ratio:.2f})"


def normalise(text: str) -> list[str]:
    """Lowercase words without punctuation; digits as Whisper writes them map to words."""
    words = re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split()
    return [_NUMBERS.get(w, w) for w in words]


def wav_params(data: bytes) -> tuple[int, int, int]:
    """(channels, sample rate, bits per sample) from a canonical 44-byte PCM WAV header."""
    assert data[:4] == b"RIFF"
    assert data[8:12] == b"WAVE"
    assert data[12:16] == b"fmt "
    fmt_tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", data[20:36])
    assert fmt_tag == 1
    assert data[36:40] == b"data"
    return channels, rate, bits
