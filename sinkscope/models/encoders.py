"""Frozen-encoder stand-ins for Whisper (audio) and AV-HuBERT-style visual front-ends (video).

Both map padded inputs and lengths to `[B, T, D]` features and output lengths:

- `AudioEncoder`: a Whisper encoder (an HF id or path where available, or a built-in small
  Whisper-architecture config). Whisper only accepts mel inputs of exactly `2 * max_source_positions` frames, so
  inputs are padded to that and the output is cut back to the real length (50 frames/s).
- `VideoEncoder`: a 3D-conv stem, a ResNet-style 2D trunk applied per frame, and a few transformer layers:
  one vector per frame (25/s). Other visual encoders implement the same `forward(video, lengths)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder


@dataclass
class AudioEncoderConfig:
    name_or_path: str | None = None  # an HF Whisper id/path; None builds the small config below
    n_mels: int = 80
    d_model: int = 256
    layers: int = 4
    heads: int = 4
    ffn: int = 1024
    max_seconds: float = 8.0


class AudioEncoder(nn.Module):
    """Whisper encoder on log-mel features `[B, T_mel, n_mels]` (100 frames/s) -> `[B, T_mel // 2, D]`."""

    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        if cfg.name_or_path:
            from transformers import WhisperModel

            from sinkscope.errors import SinkscopeError
            from sinkscope.train.checkpoint import refusal

            try:
                self.encoder = WhisperModel.from_pretrained(cfg.name_or_path).get_encoder()
            except Exception as exc:  # transformers raises OSError, ValueError, UnpicklingError, ...
                raise SinkscopeError(f"audio encoder {cfg.name_or_path!r} (model.audio.name_or_path): not loadable "
                                     f"as a Whisper model ({refusal(exc)})") from exc
        else:
            config = WhisperConfig(
                num_mel_bins=cfg.n_mels, d_model=cfg.d_model, encoder_layers=cfg.layers,
                encoder_attention_heads=cfg.heads, encoder_ffn_dim=cfg.ffn, decoder_layers=1,
                decoder_attention_heads=cfg.heads, decoder_ffn_dim=cfg.ffn,
                max_source_positions=int(math.ceil(cfg.max_seconds * 50)),
            )
            self.encoder = WhisperEncoder(config)
        self.output_dim = self.encoder.config.d_model
        self.n_frames = 2 * self.encoder.config.max_source_positions

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = features.shape  # [B, T_mel, n_mels]
        if t > self.n_frames:
            raise ValueError(f"audio of {t / 100:.1f} s is longer than the encoder's {self.n_frames / 100:.1f} s")
        x = F.pad(features.transpose(1, 2), (0, self.n_frames - t))  # [B, n_mels, n_frames]
        hidden = self.encoder(input_features=x).last_hidden_state  # [B, n_frames // 2, D]
        out_len = (lengths + 1) // 2
        return hidden[:, : int(out_len.max())], out_len


@dataclass
class VideoEncoderConfig:
    channels: int = 16
    d_model: int = 256
    layers: int = 2
    heads: int = 4


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.skip(x))


class VideoEncoder(nn.Module):
    """Mouth ROIs `[B, T, 88, 88]` -> `[B, T, D]`, one vector per frame."""

    def __init__(self, cfg: VideoEncoderConfig):
        super().__init__()
        c = cfg.channels
        self.stem = nn.Sequential(
            nn.Conv3d(1, c, (5, 7, 7), (1, 2, 2), (2, 3, 3), bias=False), nn.BatchNorm3d(c), nn.ReLU(),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
        )  # [B, c, T, 22, 22]
        self.trunk = nn.Sequential(_Block(c, c, 1), _Block(c, 2 * c, 2), _Block(2 * c, 4 * c, 2),
                                   _Block(4 * c, 8 * c, 2))  # [B*T, 8c, 3, 3]
        self.proj = nn.Linear(8 * c, cfg.d_model)
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.heads, 4 * cfg.d_model, dropout=0.1, batch_first=True,
                                           norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.output_dim = cfg.d_model

    @staticmethod
    def positions(t: int, d: int, device) -> torch.Tensor:
        pos = torch.arange(t, device=device, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, d, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / d))
        pe = torch.zeros(t, d, device=device)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
        return pe

    def forward(self, video: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, h, w = video.shape
        x = self.stem(video[:, None])  # [B, c, T, h', w']
        x = x.transpose(1, 2).reshape(b * t, x.shape[1], x.shape[3], x.shape[4])
        x = self.trunk(x).mean(dim=(2, 3)).reshape(b, t, -1)  # [B, T, 8c]
        x = self.proj(x) + self.positions(t, self.output_dim, x.device)
        pad = torch.arange(t, device=x.device)[None, :] >= lengths.to(x.device)[:, None]  # True = padding
        return self.transformer(x, src_key_padding_mask=pad), lengths
