"""Wyoming (Home Assistant's voice protocol) through a real `llmux serve`, with the `wyoming`
package's own client (``AsyncTcpClient``), and the ``wyoming:`` config section.

The engine tests run the built-in default stack (Whisper tiny.en, the Piper voice joe) with a
``wyoming:`` section added; the stand-in tests run ``tests/upstream.py`` children as ``cmd``
models (no engines needed).
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import yaml

from llmux.backends.process import free_port
from llmux.config import parse_config
from llmux.errors import ConfigError
from tests.audio import assert_heard
from tests.conftest import Server, StartServer, upstream_cmd, wait_until
from tests.engine_children import require_engine

with warnings.catch_warnings():
    # wyoming.audio imports audioop, deprecated since Python 3.11: import it once, quietly.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

    from wyoming.asr import Transcribe, Transcript
    from wyoming.audio import AudioChunk, AudioStart, AudioStop
    from wyoming.client import AsyncTcpClient
    from wyoming.error import Error
    from wyoming.event import Event, async_read_event
    from wyoming.info import Describe, Info
    from wyoming.tts import (
        Synthesize,
        SynthesizeChunk,
        SynthesizeStart,
        SynthesizeStop,
        SynthesizeVoice,
    )

from llmux.api.wyoming import SentenceSplitter, WavStream, wav_bytes

KITCHEN = "Please turn on the kitchen lights."
READ_TIMEOUT = 120.0
"""Seconds for one Wyoming answer (a cold load of a voice on a busy 2-core box included)."""

# --------------------------------------------------------------------------- config


def _config(wyoming: dict[str, Any], **server: Any) -> str:
    return yaml.safe_dump(
        {
            "server": server,
            "models": {
                "ears": {"type": "asr", "vram_gb": 1, "cmd": "x --port ${PORT}"},
                "voice": {"type": "tts", "vram_gb": 1, "cmd": "x --port ${PORT}", "aliases": ["v"]},
                "chat": {"type": "llm", "vram_gb": 1, "cmd": "x --port ${PORT}"},
            },
            "wyoming": wyoming,
        }
    )


def test_config_wyoming_section() -> None:
    config = parse_config(_config({"asr": {"ears": 10300}, "tts": 10200, "zeroconf": True}))
    assert config.wyoming is not None
    assert config.wyoming.host == "127.0.0.1"
    assert config.wyoming.ports() == [("asr:ears", 10300), ("tts", 10200)]
    assert config.wyoming.zeroconf is True
    only_tts = parse_config(_config({"tts": 10200}))
    assert only_tts.wyoming is not None
    assert (only_tts.wyoming.asr, only_tts.wyoming.zeroconf) == ({}, False)
    assert parse_config(yaml.safe_dump({"models": {}})).wyoming is None


@pytest.mark.parametrize(
    ("wyoming", "server", "expected"),
    [
        ({}, {}, "wyoming (line"),
        ({"asr": {"nobody": 10300}}, {}, "wyoming.asr.nobody: no model has the id 'nobody'"),
        ({"asr": {"voice": 10300}}, {}, "'voice' is a tts model, not an asr one"),
        ({"asr": {"chat": 10300}}, {}, "'chat' is a llm model, not an asr one"),
        (
            {"asr": {"ears": 10200}, "tts": 10200},
            {},
            "port 10200 is given to both asr:ears and tts",
        ),
        ({"tts": 8080}, {"port": 8080}, "port 8080 (tts) is server.port"),
        ({"asr": {"ears": 0}}, {}, "wyoming.asr.ears"),
        ({"tts": 70000}, {}, "wyoming.tts"),
        ({"tts": 10200, "host": ""}, {}, "wyoming.host"),
        ({"tts": 10200, "port": 1}, {}, "wyoming.port"),
        ({"tts": 10200, "zeroconf": "maybe"}, {}, "wyoming.zeroconf"),
    ],
)
def test_config_wyoming_errors(
    wyoming: dict[str, Any], server: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_config(wyoming, **server))
    assert any(expected in p for p in caught.value.problems), caught.value.problems


def test_config_alias_is_named_and_tts_needs_a_voice() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_config({"asr": {"v": 10300}}))
    assert "'v' is an alias of 'voice': use the id" in caught.value.problems[0]
    no_voice = yaml.safe_dump(
        {
            "models": {"ears": {"type": "asr", "vram_gb": 1, "cmd": "x ${PORT}"}},
            "wyoming": {"tts": 10200},
        }
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(no_voice)
    assert "wyoming.tts: no model of type tts is configured" in caught.value.problems[0]


# --------------------------------------------------------------------------- pieces


def test_sentences_complete_as_text_streams_in() -> None:
    split = SentenceSplitter(max_chars=40)
    assert split.add("Hello the") == []
    assert split.add("re. How are") == ["Hello there."]
    assert split.add(" you? Mr. Smith is") == ["How are you?"]
    assert split.add(" here.\nNew line") == ["Mr. Smith is here."]
    assert split.add(" and ") == []
    pieces = split.add("word " * 20)  # no end in sight: cut at a space before 40 characters
    assert pieces[0].startswith("New line and word")
    assert all(len(p) <= 40 for p in pieces)
    assert split.finish()[-1].endswith("word")
    assert split.finish() == []


def test_wav_stream_header_chunks_and_widths() -> None:
    pcm = bytes(range(200)) * 10
    wav = wav_bytes(pcm, 22050)
    # A LIST chunk before the data, fed a byte at a time at first.
    with_list = wav[:36] + b"LIST" + (4).to_bytes(4, "little") + b"INFO" + wav[36:]
    stream = WavStream("m")
    out = b"".join(stream.feed(with_list[i : i + 1]) for i in range(60))
    out += stream.feed(with_list[60:] + b"trailing chunk, not audio")
    assert stream.format is not None
    assert (stream.format.rate, stream.format.channels) == (22050, 1)
    assert out == pcm  # the data chunk's size says where the audio ends
    eight = wav_bytes(bytes([128, 255, 0]) * 4, 8000, width=1)
    stream = WavStream("m")
    converted = stream.feed(eight)
    assert len(converted) == 24  # 12 samples as 16-bit
    with pytest.raises(Exception, match="not a WAV file"):
        WavStream("m").feed(b"ID3\x04" + bytes(40))


# --------------------------------------------------------------------------- the client side


async def _exchange(port: int, events: list[Event], until: Callable[[Event], bool]) -> list[Event]:
    """Send ``events``, then read until ``until`` says so (or the connection ends)."""
    got: list[Event] = []
    async with AsyncTcpClient("127.0.0.1", port, read_timeout=READ_TIMEOUT) as client:
        for event in events:
            await client.write_event(event)
        while (event := await client.read_event()) is not None:
            got.append(event)
            if until(event):
                break
    return got


def exchange(port: int, events: list[Event], until: Callable[[Event], bool]) -> list[Event]:
    return asyncio.run(_exchange(port, events, until))


def describe(port: int) -> Info:
    (event,) = exchange(port, [Describe().event()], lambda e: True)
    return Info.from_event(event)


def audio_of(events: list[Event]) -> tuple[AudioStart, bytes]:
    start = next(AudioStart.from_event(e) for e in events if AudioStart.is_type(e.type))
    chunks = [AudioChunk.from_event(e) for e in events if AudioChunk.is_type(e.type)]
    assert all((c.rate, c.width, c.channels) == (start.rate, 2, start.channels) for c in chunks)
    return start, b"".join(c.audio for c in chunks)


def synthesize(port: int, text: str = KITCHEN, voice: str | None = None) -> list[Event]:
    event = Synthesize(text=text, voice=SynthesizeVoice(name=voice) if voice else None).event()
    return exchange(port, [event], lambda e: e.type in ("audio-stop", "error"))


def transcription_events(pcm: bytes, rate: int, language: str | None = "en") -> list[Event]:
    """``transcribe``, then ``pcm`` (16-bit mono at ``rate``) in 100 ms chunks."""
    step = rate // 10 * 2
    return [
        Transcribe(language=language).event(),
        AudioStart(rate=rate, width=2, channels=1).event(),
        *(AudioChunk(rate, 2, 1, pcm[i : i + step]).event() for i in range(0, len(pcm), step)),
        AudioStop().event(),
    ]


def transcribe(port: int, pcm: bytes, rate: int) -> Event:
    events = exchange(
        port, transcription_events(pcm, rate), lambda e: e.type in ("transcript", "error")
    )
    return events[-1]


def error_of(events: list[Event]) -> Error:
    assert events, "no answer"
    assert Error.is_type(events[-1].type), events
    return Error.from_event(events[-1])


def metric(server: Server, model: str, code: int) -> float:
    for line in server.get("/metrics").text.splitlines():
        if line.startswith(
            f'llmux_requests_total{{code="{code}",endpoint="wyoming",model="{model}"}}'
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def events_seen(server: Server, model: str, wanted: set[str]) -> set[str]:
    """The /events (replayed) of ``model`` among ``wanted``, read until all were seen."""
    seen: set[str] = set()
    with httpx.stream(
        "GET", server.url + "/events?replay=true", headers=server.headers(), timeout=30
    ) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: "):
                event = yaml.safe_load(line[6:])
                if event["model"] == model and event["event"] in wanted:
                    seen.add(event["event"])
                    if seen == wanted:
                        break
    return seen


# --------------------------------------------------------------------------- stand-ins


def test_stand_ins_describe_speak_transcribe_and_announce(
    start_server: StartServer, tmp_path: Any
) -> None:
    asr_port, tts_port = free_port(), free_port()
    config = {
        "models": {
            "ears": {"type": "asr", "vram_gb": 1, "cmd": upstream_cmd(tmp_path, "ears")},
            "voice": {"type": "tts", "vram_gb": 1, "cmd": upstream_cmd(tmp_path, "voice")},
        },
        "wyoming": {"asr": {"ears": asr_port}, "tts": tts_port, "zeroconf": True},
    }
    server = start_server(yaml.safe_dump(config))
    wait_until(
        lambda: server.log.read_text().count(" as 'llmux ") == 2, 30, "both zeroconf announcements"
    )

    asr = describe(asr_port)
    assert [p.name for p in asr.asr] == ["llmux"]
    assert [m.name for m in asr.asr[0].models] == ["ears"]
    assert asr.asr[0].models[0].languages == []  # an external server: llmux cannot know them
    assert asr.tts == []
    tts = describe(tts_port)
    assert [v.name for v in tts.tts[0].voices] == ["voice"]
    assert tts.tts[0].supports_synthesize_streaming is True

    # Speech: the stand-in's WAV (16 kHz, its size in the header), loaded on demand.
    events = synthesize(tts_port, "abc")
    start, pcm = audio_of(events)
    assert (start.rate, start.width, start.channels) == (16000, 2, 1)
    assert len(pcm) == 3 * 800 * 2
    assert events[-1].type == "audio-stop"
    # Speech to text: 0.5 s at 48 kHz stereo 32-bit, converted to 16 kHz 16-bit mono.
    loud = (1000).to_bytes(4, "little", signed=True) * 2 * 24000
    answer = exchange(
        asr_port,
        [
            Transcribe().event(),
            AudioStart(rate=48000, width=4, channels=2).event(),
            AudioChunk(48000, 4, 2, loud).event(),
            AudioStop().event(),
        ],
        lambda e: e.type in ("transcript", "error"),
    )[-1]
    heard = Transcript.from_event(answer).text
    assert heard.startswith("ears heard ")
    assert abs(int(heard.split()[2]) - (44 + 8000 * 2)) <= 8  # 0.5 s at 16 kHz, 16-bit mono
    assert metric(server, "voice", 200) == 1
    assert metric(server, "ears", 200) == 1

    # The announcements, seen from another zeroconf client.
    from zeroconf.asyncio import AsyncZeroconf

    async def lookup() -> set[int]:
        zc = AsyncZeroconf()
        try:
            ports: set[int] = set()
            for what in ("asr ears", "tts"):
                name = next(
                    line.split("as '", 1)[1].split("'", 1)[0]
                    for line in server.log.read_text().splitlines()
                    if f"announced {what.replace(' ', ':')} as" in line
                )
                info = await zc.async_get_service_info("_wyoming._tcp.local.", name, 3000)
                if info is not None and info.port is not None:
                    ports.add(info.port)
            return ports
        finally:
            await zc.async_close()

    found = asyncio.run(lookup())
    # mDNS over loopback in a test box answers a lookup now and then late: one server seen from
    # another process proves the announcement; both are checked in the log above.
    assert found
    assert found <= {asr_port, tts_port}
    server.stop()  # SIGTERM (uvicorn ends by re-raising it: -15)
    log = server.log.read_text()
    assert "zeroconf announcement" not in log  # no failure to announce
    assert "withdrawal" not in log  # nor to withdraw
    assert "Traceback" not in log


# --------------------------------------------------------------------------- the default stack


@pytest.fixture
def voice_stack(start_server: StartServer) -> tuple[Server, int, int]:
    """The built-in default stack with Wyoming on: (server, ASR port, TTS port)."""
    require_engine("faster-whisper", "whisper-tiny.en", "faster_whisper")
    require_engine("piper", "en_US-joe-medium", "piper")
    from llmux.config import default_config_text

    config = yaml.safe_load(default_config_text())
    asr_port, tts_port = free_port(), free_port()
    config["wyoming"] = {"asr": {"whisper": asr_port}, "tts": tts_port}
    server = start_server(yaml.safe_dump(config))
    server.wait_state("whisper", "ready", 120)
    return server, asr_port, tts_port


def _heard(port: int, pcm: bytes, rate: int) -> None:
    """Whisper tiny mishears a short phrase now and then: up to three tries."""
    text = ""
    for _ in range(3):
        answer = transcribe(port, pcm, rate)
        assert Transcript.is_type(answer.type), answer
        text = Transcript.from_event(answer).text
        try:
            assert_heard(text, KITCHEN)
            return
        except AssertionError:
            continue
    assert_heard(text, KITCHEN, what=f"at {rate} Hz")


@pytest.mark.engines
@pytest.mark.slow
def test_voice_round_trip_over_wyoming(voice_stack: tuple[Server, int, int]) -> None:
    server, asr_port, tts_port = voice_stack
    asr = describe(asr_port).asr[0]
    assert asr.installed
    assert asr.version
    (model,) = asr.models
    assert (model.name, model.languages) == ("whisper", ["en"])  # tiny.en: English only
    assert model.attribution.url
    assert model.version
    (program,) = describe(tts_port).tts
    (joe,) = program.voices
    assert (joe.name, joe.languages, joe.speakers) == ("joe", ["en_US"], None)

    assert server.model("joe")["state"] == "unloaded"  # loaded on demand by the request below
    events = synthesize(tts_port)
    start, pcm = audio_of(events)
    assert events[-1].type == "audio-stop"
    assert (start.rate, start.width, start.channels) == (22050, 2, 1)
    assert 1.0 < len(pcm) / (22050 * 2) < 6.0
    assert server.model("joe")["state"] == "ready"
    assert events_seen(server, "joe", {"loading", "ready"}) == {"loading", "ready"}
    assert metric(server, "joe", 200) == 1

    _heard(asr_port, pcm, 22050)
    resampled, _ = audioop.ratecv(pcm, 2, 1, 22050, 16000, None)
    _heard(asr_port, resampled, 16000)
    assert metric(server, "whisper", 200) >= 2

    # Streaming: each sentence spoken as it completes, then synthesize-stopped.
    stream = exchange(
        tts_port,
        [
            SynthesizeStart(voice=SynthesizeVoice(name="joe")).event(),
            SynthesizeChunk("Please turn on the kit").event(),
            SynthesizeChunk("chen lights. And then").event(),
            SynthesizeChunk(" the hall.").event(),
            Synthesize(text="Please turn on the kitchen lights. And then the hall.").event(),
            SynthesizeStop().event(),
        ],
        lambda e: e.type in ("synthesize-stopped", "error"),
    )
    assert stream[-1].type == "synthesize-stopped"
    kinds = [e.type for e in stream if e.type != "audio-chunk"]
    assert kinds == ["audio-start", "audio-stop"] * 2 + ["synthesize-stopped"]
    assert metric(server, "joe", 200) == 2

    unknown = error_of(synthesize(tts_port, voice="nobody"))
    assert unknown.code == "model_not_found"
    assert error_of(synthesize(tts_port, voice="whisper")).code == "unsupported_model"
    assert error_of(synthesize(tts_port, text="  ")).code == "invalid_request"
    assert metric(server, "", 404) == 1


@pytest.mark.engines
@pytest.mark.slow
def test_bad_audio_and_hangups(voice_stack: tuple[Server, int, int]) -> None:
    server, asr_port, tts_port = voice_stack
    ends = ("transcript", "error")

    def fails(events: list[Event]) -> str | None:
        return error_of(exchange(asr_port, events, lambda e: e.type in ends)).code

    start = AudioStart(16000, 2, 1).event()
    assert fails([Transcribe().event(), AudioStart(16000, 7, 1).event()]) == "invalid_audio"
    assert fails([Transcribe().event(), AudioStart(0, 2, 1).event()]) == "invalid_audio"
    assert fails([start, AudioChunk(16000, 2, 1, b"\x01\x02\x03").event()]) == "invalid_audio"
    assert fails([start, AudioChunk(8000, 2, 1, b"\x01\x02").event()]) == "invalid_audio"
    assert fails([AudioChunk(16000, 2, 1, b"\x01\x02").event()]) == "invalid_audio"
    assert fails([Transcribe().event(), start, AudioStop().event()]) == "invalid_audio"
    assert error_of(synthesize(asr_port)).code == "invalid_request"  # the wrong port

    async def raw(data: bytes) -> list[Event]:
        reader, writer = await asyncio.open_connection("127.0.0.1", asr_port)
        try:
            writer.write(data)
            event = await asyncio.wait_for(async_read_event(reader), 30)
            return [event] if event is not None else []
        finally:
            writer.close()
            await writer.wait_closed()

    assert error_of(asyncio.run(raw(b"not json\n"))).code == "invalid_request"
    huge = b'{"type": "audio-chunk", "payload_length": 999999999999}\n'
    assert error_of(asyncio.run(raw(huge))).code == "body_too_large"

    # A client that hangs up mid-audio: nothing held.
    async def hang_up_mid_audio() -> None:
        async with AsyncTcpClient("127.0.0.1", asr_port) as client:
            await client.write_event(Transcribe().event())
            await client.write_event(start)
            await client.write_event(AudioChunk(16000, 2, 1, bytes(3200)).event())

    asyncio.run(hang_up_mid_audio())

    # A client that hangs up mid-request: the request shows in flight, then its lease and the
    # engine's work are gone. Long audio (the phrase eight times) keeps whisper busy a while.
    spoken = audio_of(synthesize(tts_port, " ".join([KITCHEN] * 8)))[1]

    async def hang_up_mid_request() -> None:
        async with AsyncTcpClient("127.0.0.1", asr_port) as client:
            for event in transcription_events(spoken, 22050):
                await client.write_event(event)
            await asyncio.to_thread(
                wait_until,
                lambda: server.model("whisper")["in_flight"] == 1,
                60,
                "the transcription in flight",
            )

    asyncio.run(hang_up_mid_request())
    wait_until(lambda: server.model("whisper")["in_flight"] == 0, 30, "the lease released")
    assert metric(server, "whisper", 499) >= 1

    # llmux goes on serving, on both ports.
    assert describe(asr_port).asr[0].models[0].name == "whisper"
    short = audio_of(synthesize(tts_port))[1]
    _heard(asr_port, short, 22050)
    assert server.get("/health").status_code == 200
    assert metric(server, "whisper", 400) >= 6
    assert server.proc.poll() is None
    server.stop()
    assert "Traceback" not in server.log.read_text()
