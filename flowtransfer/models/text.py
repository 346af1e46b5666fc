r"""Text as token ids through a BERT encoder (optional: needs ``transformers``, extra ``bert``).

MMSA pickles hold text twice: as pre-extracted BERT features (``text``, ``(N, T, 768)``, the
default in flowtransfer) and as tokens (``text_bert``, ``(N, 3, T)``: token ids, attention mask,
segment ids). :func:`flowtransfer.data.load_mmsa` with ``text_key="text_bert"`` stores the tokens
as three float32 channels of modality ``L``. :class:`BertTextEncoder` turns those three rows into
the last hidden states of a BERT model, in flowtransfer's ``(batch, channels, time)`` layout:

.. math::
    x = (\mathrm{ids}, \mathrm{mask}, \mathrm{seg}) \in \mathbb R^{B\times 3\times T}
    \;\mapsto\; H^{(\ell)}(x)^\top \in \mathbb R^{B\times C_{\mathrm{hid}}\times T},

where :math:`H^{(\ell)}` is the output of layer :math:`\ell` (the last by default). As in the
MMSA code the encoder feeds every token position, padding included; the attention mask keeps
padded positions out of the attention, and the downstream extractor sees all ``T`` steps.

Weights come from a **local** folder (the output of ``save_pretrained``, e.g. a copy of
``bert-base-uncased``): ``BertModel.from_pretrained(path, local_files_only=True)``. Nothing is ever
downloaded. For tests a randomly initialised model is built from a ``BertConfig``.

Frozen or fine-tuned: with ``finetune=False`` the BERT parameters have ``requires_grad=False``, the
forward pass runs under ``torch.no_grad()`` and the model stays in eval mode (dropout off) even when
a parent module calls ``.train()``. :meth:`BertTextEncoder.set_finetune` switches at any time; the
forward pass follows the ``finetune`` flag, not the ``requires_grad`` flags, so a parent that sets
``requires_grad_(True)`` on all its parameters still cannot make a frozen encoder learn (its
parameters simply receive no gradient).

Use with the extractors: the encoder goes *before* the per-modality convolution::

    from transformers import BertConfig
    enc = BertTextEncoder(config=BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=32))
    ext = ModalityExtractors({"L": 3, "A": 5, "V": 20}, d=32, encoders={"L": enc})
    h = ext({"L": tokens, "A": audio, "V": vision}, present)   # tokens: (B, 3, T) -> h["L"]: (B, 32, T*)

``input_dims["L"]`` is the encoder's input width (3 rows); the convolution reads
``enc.out_channels`` (the hidden size). Rows where ``L`` is absent never reach BERT (see
:class:`~flowtransfer.models.extractors.ModalityExtractors`).

Use with a method (DiCMoR, the fusion model): the method's config carries
``text_encoder_path`` (a local folder), or ``text_encoder_config`` (a plain dict, for tests), and
``text_finetune``; the constructor builds
``encoders = {"L": enc}`` with ``enc = text_encoder_from_options(path, config, finetune)`` (``None``
when neither is given, i.e. text is pre-extracted features) and passes it to
``ModalityExtractors``. Stages: in DiCMoR's ``"complete"`` (and ``"joint"``) stage the encoder is
fine-tuned only when ``text_finetune`` is true; in ``"recovery"`` it is frozen with the other
extractors. For example ``build_method("dicmor", info, preset="mosi",
text_encoder_path="/models/bert-base-uncased")`` with ``info`` from a ``text_key="text_bert"``
dataset.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from einops import rearrange
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    from transformers import BertConfig

__all__ = ["BertTextEncoder", "text_encoder_from_options", "text_encoders_for", "require_transformers"]

_INSTALL_HINT = "pip install 'flowtransfer[bert]' (or pip install transformers)"


def require_transformers() -> Any:
    """Import and return the ``transformers`` package, or raise ``ImportError`` saying how to get it."""
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - exercised only without transformers
        raise ImportError(f"the BERT text encoder needs the 'transformers' package: {_INSTALL_HINT}") from err
    return transformers


def _as_config(config: Any) -> BertConfig:
    transformers = require_transformers()
    if isinstance(config, transformers.BertConfig):
        return config
    if isinstance(config, Mapping):
        return transformers.BertConfig.from_dict(dict(config))
    raise TypeError(f"config must be a transformers.BertConfig or a plain dict, got {type(config).__name__}")


def _load_local(model_path: str | os.PathLike) -> nn.Module:
    """``BertModel.from_pretrained(model_path, local_files_only=True)`` with clear errors."""
    transformers = require_transformers()
    path = Path(model_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"BERT model folder not found: {path}. Pass a local folder written by save_pretrained "
            "(config.json and the weights); model names on the Hugging Face Hub are never downloaded"
        )
    if not path.is_dir():
        raise NotADirectoryError(f"BERT model path {path} is a file; pass the folder that holds config.json")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"BERT model folder {path} has no config.json (is it a save_pretrained output?)")
    try:
        model = transformers.BertModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=False)
    except (OSError, ValueError) as err:
        raise OSError(f"cannot load a BERT model from {path}: {err}") from err
    return model.float()


class BertTextEncoder(nn.Module):
    r"""BERT over MMSA token rows: ``(B, 3, T) -> (B, hidden_size, T)``.

    Args:
        model_path: a local folder written by ``save_pretrained`` (never downloads).
        config: a ``transformers.BertConfig`` (or its ``to_dict()``) to build a randomly
            initialised model instead. Give exactly one of ``model_path`` and ``config``.
        finetune: train the BERT weights (``True``) or keep them frozen (``False``: no gradients,
            ``torch.no_grad()``, eval mode).
        layer: ``"last"`` (the last hidden states) or an index into the hidden states
            (``0`` = embeddings, ``num_hidden_layers`` = last; negative indices count from the end).

    Input rows: token ids, attention mask (0/1), segment ids, as float or integer values (MMSA
    stores them as floats; they are cast to ``long``). They are checked: three rows, finite,
    whole numbers, ids in ``[0, vocab_size)``, mask in ``{0, 1}``, segment ids in
    ``[0, type_vocab_size)``, ``T <= max_position_embeddings``.

    Attributes:
        bert: the ``transformers.BertModel`` (no pooling layer).
        in_channels: 3. out_channels: the hidden size. finetune: the current mode.
    """

    in_channels: int = 3

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        config: BertConfig | Mapping[str, Any] | None = None,
        finetune: bool = False,
        layer: str | int = "last",
    ) -> None:
        super().__init__()
        if (model_path is None) == (config is None):
            raise ValueError("give exactly one of model_path (a local BERT folder) and config (random init)")
        if model_path is not None:
            self.bert = _load_local(model_path)
        else:
            transformers = require_transformers()
            self.bert = transformers.BertModel(_as_config(config), add_pooling_layer=False)
        cfg = self.bert.config
        n_layers = int(cfg.num_hidden_layers)
        if layer != "last":
            if isinstance(layer, bool) or not isinstance(layer, int) or not -(n_layers + 1) <= layer <= n_layers:
                raise ValueError(
                    f"layer must be 'last' or an int in [{-(n_layers + 1)}, {n_layers}] "
                    f"(0 = embeddings, {n_layers} = last), got {layer!r}"
                )
        self.layer = layer
        self.out_channels = int(cfg.hidden_size)
        self.vocab_size = int(cfg.vocab_size)
        self.type_vocab_size = int(cfg.type_vocab_size)
        self.max_length = int(cfg.max_position_embeddings)
        self.finetune = True
        self.set_finetune(finetune)

    def set_finetune(self, finetune: bool) -> BertTextEncoder:
        """Fine-tune (``True``) or freeze (``False``) the BERT weights; returns ``self``."""
        self.finetune = bool(finetune)
        for p in self.bert.parameters():
            p.requires_grad_(self.finetune)
        # a frozen encoder is always in eval mode; a fine-tuned one follows its parent
        self.train(self.training if self.finetune else False)
        return self

    def train(self, mode: bool = True) -> BertTextEncoder:
        """Set the mode; a frozen encoder stays in eval mode (dropout off) whatever ``mode`` says."""
        return super().train(bool(mode) and getattr(self, "finetune", True))

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[1] != 3:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"BertTextEncoder expects (batch, 3, time) rows (token ids, attention mask, segment ids), got {got}"
            )
        t = x.shape[-1]
        if t < 1:
            raise ValueError("BertTextEncoder input has zero time steps")
        if t > self.max_length:
            raise ValueError(f"sequence length {t} exceeds the model's max_position_embeddings {self.max_length}")
        if x.is_floating_point():
            if not bool(torch.isfinite(x).all()):
                raise ValueError("BertTextEncoder input (token ids / mask / segment ids) contains NaN or inf")
            if not bool((x == x.round()).all()):
                raise ValueError(
                    "BertTextEncoder input rows must hold whole numbers (token ids, 0/1 mask, segment ids)"
                )
        ids, mask, seg = x.long().unbind(1)
        if ids.numel():
            if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
                raise ValueError(
                    f"token ids must lie in [0, {self.vocab_size}), got [{int(ids.min())}, {int(ids.max())}]"
                )
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("attention mask (row 1) must hold only 0 and 1")
            if int(seg.min()) < 0 or int(seg.max()) >= self.type_vocab_size:
                raise ValueError(
                    f"segment ids (row 2) must lie in [0, {self.type_vocab_size}), "
                    f"got [{int(seg.min())}, {int(seg.max())}]"
                )
        return ids, mask, seg

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, T)`` token rows -> ``(B, out_channels, T)`` hidden states (dtype of the weights)."""
        ids, mask, seg = self._split(x)
        want_all = self.layer != "last"
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.finetune):
            out = self.bert(
                input_ids=ids,
                attention_mask=mask,
                token_type_ids=seg,
                output_hidden_states=want_all,
                return_dict=True,
            )
        h = out.hidden_states[self.layer] if want_all else out.last_hidden_state
        return rearrange(h, "b t c -> b c t")

    def extra_repr(self) -> str:
        return f"out_channels={self.out_channels}, layer={self.layer!r}, finetune={self.finetune}"


def text_encoder_from_options(
    path: str | os.PathLike | None = None,
    config: BertConfig | Mapping[str, Any] | None = None,
    finetune: bool = False,
    layer: str | int = "last",
) -> BertTextEncoder | None:
    """The text encoder a method's options ask for, or ``None`` when they ask for none.

    ``path`` (a local ``save_pretrained`` folder) or ``config`` (``BertConfig`` or plain dict, random
    init) builds a :class:`BertTextEncoder`; giving both raises ``ValueError``; giving neither
    returns ``None`` (text arrives as pre-extracted features and needs no encoder).
    """
    if path is None and config is None:
        return None
    return BertTextEncoder(model_path=path, config=config, finetune=finetune, layer=layer)


def text_encoders_for(config: Any, modalities: Sequence[str]) -> dict[str, BertTextEncoder] | None:
    """``{text_modality: BertTextEncoder}`` from a method configuration's ``text_encoder_path`` /
    ``text_encoder_config`` / ``text_finetune`` / ``text_modality`` fields, or ``None`` when it
    asks for no encoder (what :class:`~flowtransfer.models.extractors.ModalityExtractors` takes)."""
    enc = text_encoder_from_options(config.text_encoder_path, config.text_encoder_config, config.text_finetune)
    if enc is None:
        return None
    if config.text_modality not in modalities:
        raise ValueError(f"text_modality {config.text_modality!r} is not one of the modalities {list(modalities)}")
    return {config.text_modality: enc}
