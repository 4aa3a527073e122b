"""The Llama-AVSR architecture on any HF causal LM (ARCHITECTURE.md, "Token layout" and "Compression").

    audio features -> AudioEncoder -> compress(K_a) -> Projector --+
    mouth ROIs     -> VideoEncoder -> compress(K_v) -> Projector --+--> spliced into the LLM input embeddings
    [BOS] <audio> A_1..A_n </audio> <video> V_1..V_m </video> [prompt] [transcript] [EOS]

The LLM is frozen and trained through peft LoRA; the encoders are frozen; the projectors train. `build()`
returns the input embeddings, the attention mask, the labels (-100 everywhere except transcript and EOS), and
per sample the segment spans and token strings that the recorder writes into traces. `generate()` decodes;
`AVSRModel.from_pretrained(dir)` rebuilds a trained model from a run, an export or a registered name (`demo`).
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from sinkscope.arguments import whole_number
from sinkscope.models.encoders import AudioEncoder, AudioEncoderConfig, VideoEncoder, VideoEncoderConfig
from sinkscope.models.mome import MoMEConfig, MoMELayers

PROMPTS = {
    "asr": "Transcribe speech to text.",
    "vsr": "Transcribe video to text.",
    "avsr": "Transcribe speech and video to text.",
}
MODALITIES = {"asr": ("audio",), "vsr": ("video",), "avsr": ("audio", "video")}
DELIMITERS = ("<audio>", "</audio>", "<video>", "</video>")
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The linear layers of a Llama-family decoder block that LoRA can target."""


def compress(x: torch.Tensor, lengths: torch.Tensor, k: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Downsample `[B, T, D]` by K along time, dropping the remainder T mod K.

    `stack` (Llama-AVSR) concatenates K consecutive frames into `[B, T//K, K*D]`; `avgpool` (the sinks paper)
    averages them into `[B, T//K, D]`. Lengths become `lengths // K`.
    """
    if k < 1:
        raise ValueError(f"the compression rate must be >= 1, not {k}")
    b, t, d = x.shape
    keep = (t // k) * k
    x = x[:, :keep].reshape(b, t // k, k, d)  # [B, T//K, K, D]
    if mode == "stack":
        out = x.reshape(b, t // k, k * d)
    elif mode == "avgpool":
        out = x.mean(dim=2)
    else:
        raise ValueError(f"compression must be 'stack' or 'avgpool', not {mode!r}")
    return out, lengths // k


class Projector(nn.Module):
    """Linear(in, hidden) -> ReLU -> Linear(hidden, d_llm), with an optional LayerNorm on the output."""

    def __init__(self, d_in: int, d_llm: int, hidden: int = 2048, norm: bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_llm))
        self.norm = nn.LayerNorm(d_llm) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.net(x))


@dataclass
class AVSRConfig:
    llm: str = "smollm2-135m"
    mode: str = "avsr"
    compression: str = "stack"
    k_audio: int = 4
    k_video: int = 2
    audio: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    video: VideoEncoderConfig = field(default_factory=VideoEncoderConfig)
    projector_hidden: int = 2048
    projector_norm: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    # Matryoshka: the compression rates one model is trained at, as [k_audio, k_video] pairs (the unused one is
    # ignored for ASR/VSR); empty: the single rate (k_audio, k_video). Needs `avgpool`: one projector serves every
    # rate (avgpool keeps the feature width, so the projector sees the same input space at each rate).
    rates: tuple[tuple[int, ...], ...] = ()
    rate_weights: tuple[float, ...] = ()  # weight of each rate's cross-entropy (default 1 each)
    mome: MoMEConfig | None = None  # mixture-of-experts adapters in the LLM (sinkscope.models.mome)

    @property
    def rate_set(self) -> list[tuple[int, int]]:
        """The (k_audio, k_video) pairs this model runs at; the first is its default."""
        return [(int(r[0]), int(r[1])) for r in self.rates] or [(self.k_audio, self.k_video)]

    @property
    def video_multiple(self) -> int:
        """The A/V crop this model was trained with: video cut to a multiple of this many frames and the audio to
        the same duration, before features are computed (`AVSRDataset(video_multiple=...)`). AVSR models use K_v
        (the least common multiple over a Matryoshka rate set, so that every rate sees the same frames); without
        the crop the demo model's held-out WER moves from 9.7 % to 12.2 % (measured on 409 utterances)."""
        return math.lcm(*(kv for _, kv in self.rate_set)) if self.mode == "avsr" else 1

    def check(self) -> None:
        if self.mode not in MODALITIES:
            raise ValueError(f"mode must be one of {sorted(MODALITIES)}, not {self.mode!r}")
        if self.compression not in ("stack", "avgpool"):
            raise ValueError(f"compression must be 'stack' or 'avgpool', not {self.compression!r}")
        for name in ("k_audio", "k_video", "projector_hidden", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)}")
        if self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_alpha must be > 0 and lora_dropout in [0, 1) (got {self.lora_alpha}, "
                             f"{self.lora_dropout})")
        if not self.lora_targets:
            raise ValueError("lora_targets must name at least one module, e.g. [q_proj, v_proj]")
        unknown = sorted(set(self.lora_targets) - set(LORA_MODULES))
        if unknown:
            raise ValueError(f"lora_targets {unknown} are not modules of a Llama-family decoder block; choose from "
                             f"{list(LORA_MODULES)}")
        if not 0 < self.audio.max_seconds <= 30:
            raise ValueError(f"audio.max_seconds must be in (0, 30] (Whisper's window is 30 s), not "
                             f"{self.audio.max_seconds}")
        if self.rates:
            if self.compression != "avgpool":
                raise ValueError("a Matryoshka rate set needs compression: avgpool (one projector for all rates)")
            bad = [list(r) for r in self.rates if len(r) != 2 or min(r) < 1]
            if bad:
                raise ValueError(f"rates must be [k_audio, k_video] pairs of rates >= 1; not {bad}")
        if self.rate_weights and (len(self.rate_weights) != len(self.rate_set) or min(self.rate_weights) < 0):
            raise ValueError(f"rate_weights must give one weight >= 0 per rate ({len(self.rate_set)}), not "
                             f"{list(self.rate_weights)}")
        if self.mome is not None:
            self.mome.check()
        for name in ("n_mels", "d_model", "layers", "heads", "ffn"):
            if getattr(self.audio, name) < 1:
                raise ValueError(f"audio.{name} must be >= 1, not {getattr(self.audio, name)}")
        for name in ("channels", "d_model", "layers", "heads"):
            if getattr(self.video, name) < 1:
                raise ValueError(f"video.{name} must be >= 1, not {getattr(self.video, name)}")


def dataset_for(cfg: AVSRConfig, root, split: str | None = "test", **kwargs):
    """The corpus split as a model of config `cfg` takes it: its A/V crop (see `AVSRConfig.video_multiple`), only
    the features of the modalities it uses (a VSR model skips the log-mel and the noise), and its audio window
    (longer utterances are refused by name, or skipped and counted with `skip_bad=True`)."""
    from sinkscope.data.dataset import AVSRDataset

    kwargs.setdefault("load", MODALITIES[cfg.mode])
    if "audio" in MODALITIES[cfg.mode]:
        kwargs.setdefault("max_seconds", cfg.audio.max_seconds)
    return AVSRDataset(root, split, video_multiple=cfg.video_multiple, **kwargs)


@contextmanager
def _quiet():
    """Silence transformers' notices and deprecation warnings that say nothing to a sinkscope user (the
    resize notice, peft's use of a deprecated property)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(level)


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


class AVSRModel(nn.Module):
    """Frozen encoders + trainable projectors + a frozen LLM with LoRA."""

    def __init__(self, cfg: AVSRConfig, llm=None, tokenizer=None):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        cfg.check()
        self.cfg = cfg
        if llm is None:
            from sinkscope.models.llm import load_llm

            llm, tokenizer = load_llm(cfg.llm)
        tokenizer.add_special_tokens({"additional_special_tokens": list(DELIMITERS)})
        # transformers draws the new delimiter rows around the mean embedding from the global RNG; fix the draw so
        # that a model rebuilt for evaluation has exactly the rows it was trained with (they are not trained)
        with torch.random.fork_rng(devices=[]), _quiet():
            torch.manual_seed(0)
            llm.resize_token_embeddings(len(tokenizer))
        for p in llm.parameters():
            p.requires_grad_(False)
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.lora_targets))
        with _quiet():
            try:
                self.llm = get_peft_model(llm, lora)
            except ValueError as exc:  # peft: target modules not found in the LLM
                from sinkscope.errors import SinkscopeError

                raise SinkscopeError(f"model: lora_targets {list(cfg.lora_targets)} do not fit {cfg.llm} "
                                     f"({str(exc).splitlines()[0][:200]})") from exc
        self.tokenizer = tokenizer
        d_llm = llm.config.get_text_config().hidden_size
        self.audio_encoder = AudioEncoder(cfg.audio) if "audio" in MODALITIES[cfg.mode] else None
        self.video_encoder = VideoEncoder(cfg.video) if "video" in MODALITIES[cfg.mode] else None
        widen = (lambda k: k) if cfg.compression == "stack" else (lambda k: 1)
        self.audio_projector = Projector(self.audio_encoder.output_dim * widen(cfg.k_audio), d_llm,
                                         cfg.projector_hidden, cfg.projector_norm) if self.audio_encoder else None
        self.video_projector = Projector(self.video_encoder.output_dim * widen(cfg.k_video), d_llm,
                                         cfg.projector_hidden, cfg.projector_norm) if self.video_encoder else None
        for enc in (self.audio_encoder, self.video_encoder):
            if enc is not None:
                for p in enc.parameters():
                    p.requires_grad_(False)
        self.delimiter_ids = {d: tokenizer.convert_tokens_to_ids(d) for d in DELIMITERS}
        self._token_texts: dict[int, str] = {}
        self.rate_index = 0
        self.mome = None
        if cfg.mome is not None:
            from sinkscope.record.blocks import find_decoder_layers

            self.mome = MoMELayers(find_decoder_layers(self.llm)[1], d_llm, cfg.mome, len(cfg.rate_set))

    def set_rate(self, index: int) -> None:
        """Run at rate `index` of the model's rate set (compression and, for MoME, the router)."""
        n = len(self.cfg.rate_set)
        self.rate_index = whole_number(index, "rate index", 0, n - 1, f" (the model's {n} rates {self.cfg.rate_set})")
        if self.mome is not None:
            self.mome.rate = index

    @property
    def rate(self) -> tuple[int, int]:
        return self.cfg.rate_set[self.rate_index]

    # ------------------------------------------------------------------------------------------- inputs
    def _embed_ids(self, ids: list[int], device) -> torch.Tensor:
        return self.llm.get_input_embeddings()(torch.tensor(ids, dtype=torch.long, device=device))

    def encode(self, batch: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Projected modality tokens per modality: `([B, n, d_llm], lengths)`, on the model's device."""
        device = self.llm.get_input_embeddings().weight.device
        out = {}
        if self.audio_encoder is not None:
            with torch.set_grad_enabled(_trainable(self.audio_encoder)):
                feats, lengths = self.audio_encoder(batch["audio_features"].to(device), batch["audio_lengths"])
            feats, lengths = compress(feats, lengths, self.rate[0], self.cfg.compression)
            out["audio"] = (self.audio_projector(feats), lengths)
        if self.video_encoder is not None:
            with torch.set_grad_enabled(_trainable(self.video_encoder)):
                feats, lengths = self.video_encoder(batch["video"].to(device), batch["video_lengths"])
            feats, lengths = compress(feats, lengths, self.rate[1], self.cfg.compression)
            out["video"] = (self.video_projector(feats), lengths)
        return out

    def build(self, batch: dict, with_transcript: bool = True, padding_side: str = "right") -> dict:
        """LLM inputs in the Llama-AVSR layout, padded (right for training, left for generation), with labels,
        and per sample the segment spans, token strings and vocabulary ids (-1 at the modality frames), positions
        within the unpadded sample."""
        tok = self.tokenizer
        device = self.llm.get_input_embeddings().weight.device
        encoded = self.encode(batch)
        prompt_ids = tok(PROMPTS[self.cfg.mode], add_special_tokens=False)["input_ids"]
        rows, labels, segments, tokens, token_ids = [], [], [], [], []
        for i in range(len(batch["ids"])):
            pieces: list[tuple[str, torch.Tensor, list[str], list[int], list[int]]] = []

            def ids_piece(name, ids, learn=False, pieces=pieces):
                pieces.append((name, self._embed_ids(ids, device), [self._token_text(t) for t in ids],
                               list(ids) if learn else [-100] * len(ids), list(ids)))

            ids_piece("bos", [tok.bos_token_id])
            for modality in MODALITIES[self.cfg.mode]:
                emb, lengths = encoded[modality]
                n = int(lengths[i])
                ids_piece(f"{modality}_start", [self.delimiter_ids[f"<{modality}>"]])
                letter = modality[0].upper()
                pieces.append((modality, emb[i, :n], [f"{letter}{j}" for j in range(n)], [-100] * n, [-1] * n))
                ids_piece(f"{modality}_end", [self.delimiter_ids[f"</{modality}>"]])
            ids_piece("prompt", prompt_ids)
            if with_transcript:
                ids_piece("transcript", tok(" " + batch["transcripts"][i], add_special_tokens=False)["input_ids"],
                          learn=True)
                ids_piece("eos", [tok.eos_token_id], learn=True)
            spans, start = [], 0
            for name, emb, *_ in pieces:
                spans.append((name, start, start + len(emb)))
                start += len(emb)
            rows.append(torch.cat([p[1] for p in pieces]))
            labels.append([lab for p in pieces for lab in p[3]])
            segments.append(spans)
            tokens.append([t for p in pieces for t in p[2]])
            token_ids.append([t for p in pieces for t in p[4]])
        width = max(len(r) for r in rows)
        d = rows[0].shape[1]
        embeds = torch.zeros(len(rows), width, d, dtype=rows[0].dtype, device=device)
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
        label_t = torch.full((len(rows), width), -100, dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            span = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
            embeds[i, span] = r
            mask[i, span] = 1
            label_t[i, span] = torch.tensor(labels[i], device=device)
        return {"inputs_embeds": embeds, "attention_mask": mask, "labels": label_t, "segments": segments,
                "tokens": tokens, "token_ids": token_ids}

    def _token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def transcript_loss(self, built: dict, output_hidden_states: bool = False):
        """Mean cross-entropy over the transcript+EOS tokens of `build()`'s output, as `labels=` would give, but
        with the LM head applied only at the positions that predict a label (≈ 8x less head compute here).
        Returns `(loss, outputs)`; `outputs.hidden_states` is filled when asked."""
        labels = built["labels"]
        targets = labels[:, 1:]
        keep = torch.nonzero((targets != -100).any(0)).flatten()
        res = self.llm(inputs_embeds=built["inputs_embeds"], attention_mask=built["attention_mask"],
                       logits_to_keep=keep, output_hidden_states=output_hidden_states)
        logits = res.logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 targets[:, keep].reshape(-1), ignore_index=-100)
        return loss, res

    @torch.no_grad()
    def generate(self, batch: dict, max_new_tokens: int = 24, beams: int = 1, built: dict | None = None) -> list[str]:
        """Greedy (or beam) transcripts through the LLM's `generate(inputs_embeds=...)`, left-padded, lower-cased;
        `built` passes `build(batch, with_transcript=False, padding_side="left")` when the caller has it."""
        if built is None:
            built = self.build(batch, with_transcript=False, padding_side="left")
        tok = self.tokenizer
        out = self.llm.generate(inputs_embeds=built["inputs_embeds"], attention_mask=built["attention_mask"],
                                max_new_tokens=max_new_tokens, num_beams=beams, do_sample=False,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        return [" ".join(t.lower().split()) for t in tok.batch_decode(out, skip_special_tokens=True)]

    @classmethod
    def from_pretrained(cls, checkpoint) -> AVSRModel:
        """A trained model (in eval mode) from a training run directory, an export, or a registered name such as
        `demo`; see `sinkscope.models.pretrained.load_trained`, which also returns the run's config."""
        from sinkscope.models.pretrained import load_trained

        return load_trained(checkpoint)[0]

    def forward(self, batch: dict, output_hidden_states: bool = False) -> dict:
        """Training step: `{"loss", "hidden_states", "segments", "tokens"}` (through `forward`, so that a DDP
        wrapper sees the call and averages the gradients across processes)."""
        if len(self.cfg.rate_set) == 1 and self.mome is None:
            return self._forward_at_rate(batch, output_hidden_states)
        # Matryoshka: one forward per rate; the loss is the weighted sum of the per-rate cross-entropies (plus the
        # MoME load-balancing loss, weighted by `mome.balance`)
        weights = self.cfg.rate_weights or (1.0,) * len(self.cfg.rate_set)
        start = self.rate_index
        per_rate = []
        try:
            for index in range(len(self.cfg.rate_set)):
                self.set_rate(index)
                per_rate.append(self._forward_at_rate(batch, output_hidden_states))
        finally:
            self.set_rate(start)
        out = dict(per_rate[0])
        out["loss"] = sum(w * r["loss"] for w, r in zip(weights, per_rate, strict=True))
        out["per_rate"] = per_rate
        if self.mome is not None:
            out["balance"] = torch.stack([r["balance"] for r in per_rate]).mean()
            out["loss"] = out["loss"] + self.cfg.mome.balance * out["balance"]
        return out

    def _forward_at_rate(self, batch: dict, output_hidden_states: bool) -> dict:
        built = self.build(batch)
        if self.mome is not None:
            self.mome.mask = built["attention_mask"]
            self.mome.routing.clear()
        loss, res = self.transcript_loss(built, output_hidden_states)
        out = {"loss": loss, "hidden_states": res.hidden_states, "segments": built["segments"],
               "width": built["inputs_embeds"].shape[1], "n_tokens": built["attention_mask"].sum()}
        if self.mome is not None:
            out["balance"] = self.mome.balance()
        return out
