"""MFCC, wav reading and noise, checked against an independent scipy computation."""

from __future__ import annotations

import math
import wave
from pathlib import Path

import numpy as np
import pytest
import scipy.fft
import scipy.signal

from flowtransfer.data.audio import (
    MFCCConfig,
    add_noise,
    dct_matrix,
    frame_starts,
    hz_to_mel,
    mel_filterbank,
    mel_to_hz,
    mfcc,
    read_wav,
)


def reference_mfcc(x: np.ndarray, sr: int, cfg: MFCCConfig) -> np.ndarray:
    """Straightforward per-frame, per-filter MFCC with scipy (written independently, loops)."""
    x = np.asarray(x, dtype=np.float64)
    if cfg.preemphasis:
        x = scipy.signal.lfilter([1.0, -cfg.preemphasis], [1.0], x)
    L, n = cfg.frame_length, cfg.n_frames
    if cfg.framing == "fit":
        total = max(len(x), L)
        starts = [int(round(i * (total - L) / (n - 1))) for i in range(n)]
    else:
        total = (n - 1) * cfg.hop_length + L
        starts = [i * cfg.hop_length for i in range(n)]
    x = np.concatenate([x, np.zeros(max(0, total - len(x)))])[:total]
    window = scipy.signal.get_window("hamming", L, fftbins=True)
    # mel edges with the HTK formula, via math (no numpy vectorisation)
    fmax = sr / 2 if cfg.fmax is None else cfg.fmax
    mel_lo, mel_hi = 2595 * math.log10(1 + cfg.fmin / 700), 2595 * math.log10(1 + fmax / 700)
    edges = [
        700 * (10 ** ((mel_lo + (mel_hi - mel_lo) * j / (cfg.n_mels + 1)) / 2595) - 1)
        for j in range(cfg.n_mels + 2)
    ]
    freqs = [k * sr / cfg.n_fft for k in range(cfg.n_fft // 2 + 1)]
    weights = np.zeros((cfg.n_mels, len(freqs)))
    for j in range(cfg.n_mels):
        a, b, c = edges[j], edges[j + 1], edges[j + 2]
        for k, f in enumerate(freqs):
            if a < f < c:
                weights[j, k] = (f - a) / (b - a) if f <= b else (c - f) / (c - b)
    out = np.zeros((cfg.n_mfcc, n))
    for t, s in enumerate(starts):
        spec = scipy.fft.rfft(x[s : s + L] * window, n=cfg.n_fft)
        power = (spec.real**2 + spec.imag**2) / cfg.n_fft
        energies = weights @ power
        out[:, t] = scipy.fft.dct(np.log(energies + cfg.eps), type=2, norm="ortho")[: cfg.n_mfcc]
    return out


def chirp(n: int, sr: int = 8000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sr
    return 0.5 * np.sin(2 * np.pi * (200 + 1500 * t) * t) + 0.05 * rng.standard_normal(n)


@pytest.mark.parametrize(
    "cfg, n",
    [
        (MFCCConfig(), 4000),
        (MFCCConfig(), 150),  # shorter than one frame: zero-padded
        (MFCCConfig(preemphasis=0, n_fft=512, n_mels=26, n_mfcc=13, fmin=50, fmax=3800), 6001),
        (MFCCConfig(framing="fixed", hop_length=200), 3000),
        (MFCCConfig(framing="fixed", hop_length=200), 6000),  # cropped
    ],
)
def test_mfcc_matches_reference(cfg, n):
    x = chirp(n)
    got = mfcc(x, 8000, cfg)
    ref = reference_mfcc(x, 8000, cfg)
    assert got.shape == (cfg.n_mfcc, cfg.n_frames)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


def test_mel_scale_and_filterbank():
    f = np.array([0.0, 700.0, 1000.0, 4000.0])
    np.testing.assert_allclose(hz_to_mel(700.0), 2595 * np.log10(2))
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(f)), f, atol=1e-9)
    fb = mel_filterbank(10, 512, 8000)
    assert fb.shape == (10, 257)
    assert fb.min() >= 0 and fb.max() <= 1 + 1e-12
    # a filter that is exactly at a bin frequency peaks at 1
    fb2 = mel_filterbank(1, 8, 8000, fmin=0.0, fmax=4000.0)
    centre = mel_to_hz(hz_to_mel(4000.0) / 2)
    k = np.arange(5) * 1000.0
    expected = np.where(k <= centre, k / centre, (4000.0 - k) / (4000.0 - centre))
    np.testing.assert_allclose(fb2[0], np.clip(expected, 0, None))
    with pytest.raises(ValueError, match="fmax"):
        mel_filterbank(10, 256, 8000, fmax=5000.0)


def test_dct_matrix_is_orthonormal_dct2():
    d = dct_matrix(16, 16)
    np.testing.assert_allclose(d @ d.T, np.eye(16), atol=1e-12)
    v = np.random.default_rng(1).standard_normal(16)
    np.testing.assert_allclose(d[:5] @ v, scipy.fft.dct(v, norm="ortho")[:5], atol=1e-12)


def test_frame_starts_rules():
    cfg = MFCCConfig()
    starts, padded = frame_starts(5000, cfg)
    assert starts[0] == 0 and starts[-1] + cfg.frame_length == padded == 5000
    assert len(starts) == 20 and np.all(np.diff(starts) > 0)
    starts, padded = frame_starts(100, cfg)
    assert padded == cfg.frame_length and np.all(starts == 0)
    fixed = MFCCConfig(framing="fixed", hop_length=100)
    starts, padded = frame_starts(123, fixed)
    assert np.array_equal(starts, np.arange(20) * 100) and padded == 19 * 100 + 256
    with pytest.raises(ValueError, match="framing"):
        frame_starts(10, MFCCConfig(framing="bogus"))


def test_mfcc_rejects_bad_input():
    with pytest.raises(ValueError, match="1-D"):
        mfcc(np.zeros((2, 100)), 8000)
    with pytest.raises(ValueError, match="NaN"):
        mfcc(np.array([0.0, np.nan, 1.0]), 8000)
    with pytest.raises(ValueError, match="n_fft"):
        mfcc(np.ones(1000), 8000, MFCCConfig(n_fft=128))


@pytest.mark.parametrize("color", ["white", "pink"])
@pytest.mark.parametrize("snr", [-5.0, 0.0, 12.5])
def test_add_noise_realises_snr_and_is_seeded(color, snr):
    x = chirp(3000)
    y = add_noise(x, snr, np.random.default_rng(3), color)
    noise = y - x
    realised = 10 * np.log10(np.mean(x**2) / np.mean(noise**2))
    assert abs(realised - snr) < 1e-9
    np.testing.assert_array_equal(y, add_noise(x, snr, np.random.default_rng(3), color))
    assert not np.array_equal(y, add_noise(x, snr, np.random.default_rng(4), color))
    np.testing.assert_array_equal(add_noise(x, None, np.random.default_rng(3)), x)
    with pytest.raises(ValueError, match="color"):
        add_noise(x, snr, np.random.default_rng(3), "blue")


def test_pink_noise_has_more_low_frequency_power():
    noise = add_noise(np.ones(1 << 14), 0.0, np.random.default_rng(0), "pink") - 1.0
    p = np.abs(np.fft.rfft(noise)) ** 2
    assert p[1:200].mean() > 20 * p[-2000:].mean()


def write_wav(path: Path, samples: np.ndarray, sr: int = 8000, width: int = 2, channels: int = 1):
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(width)
        f.setframerate(sr)
        f.writeframes(samples.tobytes())


def test_read_wav(tmp_path):
    ints = np.array([0, 1, -1, 32767, -32768, 1000], dtype="<i2")
    write_wav(tmp_path / "a.wav", ints)
    x, sr = read_wav(tmp_path / "a.wav")
    assert sr == 8000 and x.dtype == np.float64
    np.testing.assert_array_equal(x, ints / 32768.0)
    assert x.min() >= -1 and x.max() <= 1
    stereo = np.array([[100, 300], [-200, 0]], dtype="<i2")
    write_wav(tmp_path / "s.wav", stereo, channels=2)
    np.testing.assert_allclose(read_wav(tmp_path / "s.wav")[0], [200 / 32768, -100 / 32768])
    u8 = np.array([128, 255, 0], dtype=np.uint8)
    write_wav(tmp_path / "u.wav", u8, width=1)
    np.testing.assert_allclose(read_wav(tmp_path / "u.wav")[0], [0.0, 127 / 128, -1.0])
    (tmp_path / "bad.wav").write_bytes(b"not a wav file at all")
    with pytest.raises(ValueError, match="not a readable PCM wav"):
        read_wav(tmp_path / "bad.wav")
    write_wav(tmp_path / "empty.wav", np.zeros(0, dtype="<i2"))
    with pytest.raises(ValueError, match="no samples"):
        read_wav(tmp_path / "empty.wav")
