"""Audio front end in plain numpy: wav reading, additive noise at a set SNR, and MFCC matrices.

The MFCC pipeline (one recording ``x`` of ``S`` samples at rate ``sr``):

1. optional pre-emphasis ``x[n] - a * x[n-1]``;
2. ``n_frames`` frames of ``frame_length`` samples (see :func:`frame_starts` for the rule that
   fixes their number), each multiplied by a periodic Hamming window
   ``w[k] = 0.54 - 0.46 cos(2 pi k / L)``;
3. power spectrum ``|rfft(frame, n_fft)|^2 / n_fft``;
4. a triangular mel filterbank on the HTK mel scale ``mel(f) = 2595 log10(1 + f / 700)``
   (``n_mels`` filters with edges equally spaced in mel between ``fmin`` and ``fmax``);
5. ``log(energy + eps)``;
6. orthonormal DCT-II over the mel axis, keeping the first ``n_mfcc`` coefficients.

The result is a ``(n_mfcc, n_frames)`` matrix (channels = coefficients, time = frames), 20 x 20 by
default as in AV-MNIST / SMIL.

Example::

    x, sr = read_wav("0_george_0.wav")
    m = mfcc(x, sr)          # (20, 20) float64
"""

from __future__ import annotations

import os
import wave
from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "MFCCConfig",
    "read_wav",
    "add_noise",
    "frame_starts",
    "hz_to_mel",
    "mel_to_hz",
    "mel_filterbank",
    "dct_matrix",
    "mfcc",
]


@dataclass(frozen=True)
class MFCCConfig:
    """Parameters of :func:`mfcc` (defaults suit 8 kHz FSDD speech).

    Attributes:
        n_mfcc: cepstral coefficients kept (channels of the output).
        n_frames: frames per recording (time steps of the output).
        frame_length: samples per frame (256 = 32 ms at 8 kHz).
        n_fft: FFT size (>= frame_length; the frame is zero-padded).
        n_mels: mel filters.
        fmin, fmax: filterbank range in Hz (``fmax=None``: ``sr / 2``).
        preemphasis: coefficient ``a`` of ``x[n] - a x[n-1]``; 0 disables it.
        framing: ``"fit"`` spreads the frames over the whole recording (hop from the duration);
            ``"fixed"`` uses hop ``hop_length`` from the start, zero-padding or cropping the
            recording to ``(n_frames - 1) * hop_length + frame_length`` samples.
        hop_length: hop in samples for ``framing="fixed"`` (ignored by ``"fit"``).
        eps: floor added before the log.
    """

    n_mfcc: int = 20
    n_frames: int = 20
    frame_length: int = 256
    n_fft: int = 256
    n_mels: int = 40
    fmin: float = 0.0
    fmax: float | None = None
    preemphasis: float = 0.97
    framing: str = "fit"
    hop_length: int = 400
    eps: float = 1e-10

    def as_dict(self) -> dict:
        return asdict(self)


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read a PCM wav file into float64 in ``[-1, 1]``; multi-channel files are averaged to mono.

    Returns:
        ``(samples (S,), sample_rate)``.

    Raises:
        ValueError: not a readable PCM wav, an unsupported sample width, or no samples.
    """
    try:
        with wave.open(os.fspath(path), "rb") as f:
            channels, width, rate, count = (
                f.getnchannels(),
                f.getsampwidth(),
                f.getframerate(),
                f.getnframes(),
            )
            raw = f.readframes(count)
    except (wave.Error, EOFError) as err:
        raise ValueError(f"{path}: not a readable PCM wav file ({err})") from err
    if width == 1:  # unsigned 8-bit
        x = (np.frombuffer(raw, np.uint8).astype(np.float64) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float64) / 32768.0
    elif width == 4:
        x = np.frombuffer(raw, "<i4").astype(np.float64) / 2147483648.0
    else:
        raise ValueError(f"{path}: unsupported sample width {width} bytes (expected 1, 2 or 4)")
    if x.size == 0:
        raise ValueError(f"{path}: the wav file holds no samples")
    x = x[: (x.size // channels) * channels].reshape(-1, channels).mean(axis=1)
    return x, rate


def add_noise(
    x: np.ndarray, snr_db: float | None, rng: np.random.Generator, color: str = "white"
) -> np.ndarray:
    """Add zero-mean Gaussian noise so that ``10 log10(P_signal / P_noise) = snr_db`` exactly.

    ``P`` is the mean square over the whole recording; the drawn noise is rescaled to the target
    power, so the realised SNR equals ``snr_db`` up to rounding. ``color="pink"`` shapes the
    noise spectrum as ``1/f`` (amplitude ``1/sqrt(f)``) before rescaling. ``snr_db=None`` (or
    ``inf``) returns ``x`` unchanged.
    """
    x = np.asarray(x, dtype=np.float64)
    if snr_db is None or np.isinf(snr_db):
        return x.copy()
    if not np.isfinite(snr_db):
        raise ValueError(f"snr_db must be a finite number or None, got {snr_db}")
    noise = rng.standard_normal(x.shape[0])
    if color == "pink":
        spectrum = np.fft.rfft(noise)
        f = np.arange(spectrum.size, dtype=np.float64)
        f[0] = 1.0
        noise = np.fft.irfft(spectrum / np.sqrt(f), n=x.shape[0])
        noise -= noise.mean()
    elif color != "white":
        raise ValueError(f"unknown noise color {color!r} (expected 'white' or 'pink')")
    p_signal = float(np.mean(x**2))
    p_noise = float(np.mean(noise**2))
    if p_signal == 0.0 or p_noise == 0.0:
        return x.copy()
    scale = np.sqrt(p_signal / (p_noise * 10.0 ** (snr_db / 10.0)))
    return x + scale * noise


def frame_starts(n_samples: int, cfg: MFCCConfig) -> tuple[np.ndarray, int]:
    """Start index of every frame and the length the signal is padded to.

    Rule ``"fit"``: the ``n_frames`` frames cover the whole recording, first frame at sample 0 and
    last frame ending at the last sample; starts are ``round(i * (S - L) / (n_frames - 1))``, so
    the hop follows the duration (frames overlap for short recordings). A recording shorter than
    ``L`` is zero-padded to ``L`` (all frames then coincide).
    Rule ``"fixed"``: starts ``i * hop_length``; the recording is zero-padded or cropped to
    ``(n_frames - 1) * hop_length + L`` samples.

    Returns:
        ``(starts (n_frames,) int64, padded_length)``.
    """
    L, n = cfg.frame_length, cfg.n_frames
    if cfg.framing == "fit":
        padded = max(n_samples, L)
        if n == 1:
            return np.zeros(1, dtype=np.int64), padded
        starts = np.rint(np.arange(n) * ((padded - L) / (n - 1))).astype(np.int64)
        return starts, padded
    if cfg.framing == "fixed":
        return np.arange(n, dtype=np.int64) * cfg.hop_length, (n - 1) * cfg.hop_length + L
    raise ValueError(f"unknown framing {cfg.framing!r} (expected 'fit' or 'fixed')")


def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    """HTK mel scale: ``2595 log10(1 + f / 700)``."""
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m: np.ndarray | float) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`: ``700 (10^(m / 2595) - 1)``."""
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(
    n_mels: int, n_fft: int, sr: int, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """Triangular filters on the HTK mel scale, ``(n_mels, n_fft // 2 + 1)``.

    Filter ``j`` rises linearly (in Hz) from edge ``j`` to a peak of 1 at edge ``j+1`` and falls
    to 0 at edge ``j+2``; the ``n_mels + 2`` edges are equally spaced in mel over
    ``[fmin, fmax]``. Weights are evaluated at the FFT bin frequencies ``k sr / n_fft``.
    """
    fmax = sr / 2.0 if fmax is None else float(fmax)
    if not 0.0 <= fmin < fmax <= sr / 2.0:
        raise ValueError(f"need 0 <= fmin < fmax <= sr/2, got fmin={fmin}, fmax={fmax}, sr={sr}")
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    bins = np.arange(n_fft // 2 + 1) * (sr / n_fft)
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None, :] - lower) / (center - lower)
    falling = (upper - bins[None, :]) / (upper - center)
    return np.clip(np.minimum(rising, falling), 0.0, None)


def dct_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Rows of the orthonormal DCT-II: ``D[k, m] = s_k cos(pi k (2m + 1) / (2 n_in))``,
    ``s_0 = sqrt(1 / n_in)``, ``s_k = sqrt(2 / n_in)``; shape ``(n_out, n_in)``."""
    k = np.arange(n_out)[:, None]
    m = np.arange(n_in)[None, :]
    d = np.cos(np.pi * k * (2 * m + 1) / (2 * n_in)) * np.sqrt(2.0 / n_in)
    d[0] /= np.sqrt(2.0)
    return d


_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _tables(cfg: MFCCConfig, sr: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    key = (cfg, sr)
    if key not in _CACHE:
        window = 0.54 - 0.46 * np.cos(2.0 * np.pi * np.arange(cfg.frame_length) / cfg.frame_length)
        fb = mel_filterbank(cfg.n_mels, cfg.n_fft, sr, cfg.fmin, cfg.fmax)
        _CACHE[key] = (window, fb, dct_matrix(cfg.n_mfcc, cfg.n_mels))
    return _CACHE[key]


def mfcc(x: np.ndarray, sr: int, cfg: MFCCConfig | None = None) -> np.ndarray:
    """MFCC matrix of one recording (steps in the module docstring).

    Args:
        x: ``(S,)`` samples (float, any scale).
        sr: sample rate in Hz.
        cfg: parameters; default :class:`MFCCConfig`.

    Returns:
        ``(n_mfcc, n_frames)`` float64.
    """
    cfg = cfg or MFCCConfig()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"expected a non-empty 1-D signal, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("the signal contains NaN or inf")
    if cfg.n_fft < cfg.frame_length:
        raise ValueError(f"n_fft ({cfg.n_fft}) must be >= frame_length ({cfg.frame_length})")
    if cfg.n_mfcc > cfg.n_mels:
        raise ValueError(f"n_mfcc ({cfg.n_mfcc}) cannot exceed n_mels ({cfg.n_mels})")
    if cfg.preemphasis:
        x = np.concatenate([x[:1], x[1:] - cfg.preemphasis * x[:-1]])
    starts, padded = frame_starts(x.size, cfg)
    if padded > x.size:
        x = np.concatenate([x, np.zeros(padded - x.size)])
    x = x[:padded]
    window, fb, dct = _tables(cfg, sr)
    frames = x[starts[:, None] + np.arange(cfg.frame_length)[None, :]] * window  # (F, L)
    power = np.abs(np.fft.rfft(frames, n=cfg.n_fft, axis=1)) ** 2 / cfg.n_fft  # (F, n_fft/2+1)
    log_mel = np.log(power @ fb.T + cfg.eps)  # (F, n_mels)
    return dct @ log_mel.T  # (n_mfcc, F)
