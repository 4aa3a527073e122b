"""The Recorder: per-layer sink and massive-activation reductions of an HF decoder, streamed.

    with Recorder(model, attention_maps=[(5, 0)], hidden_states=[3]) as rec:
        model(input_ids=ids, attention_mask=mask)       # or inputs_embeds=...; any number of calls
    rec.samples                                          # list[SampleRecord]
    rec.save("traces/run1")                              # writes or appends to a trace directory

Attention goes through the "sinkscope" AttentionInterface function (SDPA output + streamed column sums); the
residual stream, attn_out and mlp_out come from forward hooks on each decoder block. Every reduction runs on the
model's device and only `[L, H, T]`-sized results move to the CPU.
"""

from __future__ import annotations

import functools
import os
import warnings
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sinkscope.arguments import nonnegative, whole_number
from sinkscope.errors import RecorderError
from sinkscope.metrics import MASSIVE_ABS, MASSIVE_REL, MIN_QUERIES, SINK_EPS, SINK_HEAD_FRACTION, massive_frames
from sinkscope.record import _malloc, fused_cpu
from sinkscope.record import attention as attn_fn
from sinkscope.record.blocks import block_contributions, find_decoder_layers, find_hf_model, first_output
from sinkscope.record.reduce import reduce_layer
from sinkscope.trace import SampleRecord, TraceWriter


@dataclass
class _DeviceState:
    """The device path's buffers for forwards of one shape (`Recorder._device_state_for`): the layer buffer
    (`kernels.layer_layout`) and its column-sum view, the massive entries' buffers, each sample's first real
    position, and (padded forwards) the mask and the real tokens per sample, copied in at each forward; the launch
    plan, and its CUDA graphs (`kernels.LaunchGraphs`) when they are on; and the pinned host block the layers'
    results land in, with its unpacking views. The kernels' arguments then sit at the same addresses forward after
    forward, which is what a captured graph needs."""

    key: tuple
    layout: Any
    buf: torch.Tensor
    colsum_view: torch.Tensor
    massive: tuple
    first: torch.Tensor
    valid: torch.Tensor | None
    real_tokens: torch.Tensor | None
    plan: Any
    graphs: Any = None
    landing: torch.Tensor | None = None  # the pinned host block [L, N] the layers' results are copied into
    landing_views: dict | None = None  # `_landing_views` of it
    landing_rows: tuple = ()  # its rows, one a layer (indexing the block at every layer costs a dispatcher call)


@dataclass
class _Request:
    """What the attention function needs for one layer of the current forward."""

    query_valid: torch.Tensor | None
    map_heads: tuple[int, ...]
    deliver: Any
    compile: bool = False
    device_path: bool = False  # the Triton kernels (kernels.available), decided once per forward
    colsum_out: torch.Tensor | None = None  # device path: where the column sums go (the layer's buffer)
    window: int | None = None  # the layer's sliding window (its attention config's `sliding_window`), if any
    plan: Any = None  # device path: the recorder's kernels.LayerPlan for this shape (repeats a layer's launches)
    layer: int = -1  # the layer's index


_ACTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""model -> the Recorder active on it: one at a time per model (a second would take the first's attention)."""


class Recorder:
    """Record attention received, cos-to-BOS, |h| statistics and massive activations of an HF decoder.

    Args:
        model: an HF causal LM, a peft-wrapped one, or any module that contains one.
        attention_maps: `(layer, head)` pairs whose full `[T, T]` maps are kept.
        hidden_states: layers whose full residual stream `[T, D]` is kept.
        tokenizer: turns input ids into token strings (ids are shown as numbers without it).
        top_k: features with the largest |h| (and |mlp_out|) kept per layer and token.
        abs_threshold, rel_threshold: massive-activation thresholds (Sun et al.).
        hidden_dtype: dtype of the kept hidden states (float16 halves their size).
        compile: fuse the column-sum arithmetic with torch.compile (faster at long context; the first call
            compiles for a few seconds, and a C++ compiler or Triton must be available).
        routing: a MoME model's adapters (`sinkscope.models.mome.MoMELayers`), whose `routing[layer]` holds the
            top-k expert ids and gates of the last forward; they are kept per sample as `router_ids` and
            `router_gates` `[L, T, k]` (optional trace fields).
    """

    def __init__(
        self,
        model: nn.Module,
        attention_maps: Iterable[tuple[int, int]] = (),
        hidden_states: Iterable[int] = (),
        tokenizer=None,
        top_k: int = 8,
        abs_threshold: float = MASSIVE_ABS,
        rel_threshold: float = MASSIVE_REL,
        hidden_dtype: torch.dtype = torch.float32,
        compile: bool = False,
        routing=None,
    ):
        self.model = model
        self.hf_model = find_hf_model(model)
        self.body, self.layers = find_decoder_layers(self.hf_model)
        cfg = self.hf_model.config.get_text_config()
        self.n_layers = len(self.layers)
        self.n_heads = int(cfg.num_attention_heads)
        self.hidden_size = int(cfg.hidden_size)
        attention_maps, hidden_states = list(attention_maps), list(hidden_states)
        for value in [x for pair in attention_maps for x in pair] + hidden_states:
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise RecorderError(f"attention maps and hidden-state layers are given as whole numbers (layer, head "
                                    f"and layer indices); {value!r} is not one")
        self.attention_maps = sorted({(int(layer), int(head)) for layer, head in attention_maps})
        self.hidden_layers = sorted({int(layer) for layer in hidden_states})
        whole_number(top_k, "top_k", what=" (the number of features kept per token)", error=RecorderError)
        for name, value in (("abs_threshold", abs_threshold), ("rel_threshold", rel_threshold)):
            nonnegative(value, name, " (a massive activation is |h| >= abs_threshold and >= rel_threshold x the "
                        "layer's median |h|)", RecorderError)
        if not (isinstance(hidden_dtype, torch.dtype) and hidden_dtype.is_floating_point):
            raise RecorderError(f"hidden_dtype must be a floating-point torch dtype (float32, float16, bfloat16), "
                                f"not {hidden_dtype!r}")
        for layer, head in self.attention_maps:
            if not (0 <= layer < self.n_layers and 0 <= head < self.n_heads):
                raise RecorderError(f"attention map ({layer}, {head}) is outside the model's "
                                    f"{self.n_layers} layers x {self.n_heads} heads")
        for layer in self.hidden_layers:
            if not 0 <= layer < self.n_layers:
                raise RecorderError(f"hidden-state layer {layer} is outside the model's {self.n_layers} layers")
        self.tokenizer = tokenizer
        self.top_k = min(int(top_k), self.hidden_size)
        self.abs_threshold = float(abs_threshold)
        self.rel_threshold = float(rel_threshold)
        self.hidden_dtype = hidden_dtype
        self.compile = bool(compile)
        self.routing = routing
        self.samples: list[SampleRecord] = []
        self._saved: dict[str, int] = {}  # trace path -> samples already written there by this recorder
        self._counter = 0
        self._next: dict[str, Any] = {}
        self._attn_index = {id(block.self_attn): i for i, block in enumerate(self.layers)}
        self._map_heads = [tuple(h for lay, h in self.attention_maps if lay == i) for i in range(self.n_layers)]
        self._windows = [_sliding_window(block) for block in self.layers]  # read once: config attributes are slow
        self._contributions = [block_contributions(block) for block in self.layers]  # once: module getattr is slow
        self._hooks: list = []
        self._cur: dict[str, Any] | None = None
        self._previous_impl: str | None = None
        self._switched: list | None = None
        self._previous_handler = None
        self._handler_set = False
        self._token_text: dict[int, str] = {}  # id -> tokenizer.decode([id]), filled as ids are met
        self._device_state: _DeviceState | None = None  # the device path's buffers and plan for the last shape
        self._split_checked = False  # `_check_split` runs once, at the first block of the first forward
        self.split_exact: bool | None = None  # `_check_split`'s verdict (None: not checked, or nothing to check)

    # ---------------------------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> Recorder:
        active = _ACTIVE.get(self.hf_model)
        if active is not None:
            raise RecorderError(("this Recorder is already active" if active is self else
                                 f"another Recorder is already active on this {type(self.hf_model).__name__}") +
                                "; leave its `with` block (or call its __exit__) before recording the model again")
        _ACTIVE[self.hf_model] = self
        try:
            return self._enter()
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def _enter(self) -> Recorder:
        attn_fn.register()
        self._previous_impl = self.hf_model.config._attn_implementation
        self._switched = _switch_attention(self.hf_model, attn_fn.ATTN_IMPLEMENTATION)
        if self.hf_model.config._attn_implementation != attn_fn.ATTN_IMPLEMENTATION:
            raise RecorderError(f"{type(self.hf_model).__name__} does not use transformers' AttentionInterface; "
                                "sinkscope cannot record its attention")
        self._previous_handler = attn_fn.set_handler(self._attention_request)
        self._handler_set = True
        self._hooks.append(self.body.register_forward_pre_hook(self._on_body_start, with_kwargs=True))
        self._hooks.append(self.body.register_forward_hook(self._on_body_end))
        for i, (block, (attn, mlp, scale)) in enumerate(zip(self.layers, self._contributions, strict=True)):
            self._hooks.append(attn.register_forward_hook(self._store("attn_out", i, scale)))
            self._hooks.append(mlp.register_forward_hook(self._store("mlp_out", i, scale)))
            self._hooks.append(block.register_forward_hook(self._on_block_end(i)))
        if not self._split_checked:  # the first block's input, for `_check_split` (removed with the others)
            self._hooks.append(self.layers[0].register_forward_pre_hook(self._block_input, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        if _ACTIVE.get(self.hf_model) is self:
            del _ACTIVE[self.hf_model]
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self._handler_set:
            attn_fn.set_handler(self._previous_handler)
            self._handler_set = False
            if self._previous_handler is None:
                attn_fn.release_scratch()
        if self._switched is not None:
            for config, before, _ in self._switched:  # exactly the state before __enter__
                config._attn_implementation_internal = before
        elif self._previous_impl is not None:
            self.hf_model.set_attn_implementation(self._previous_impl)
        self._cur = None

    def annotate_next(
        self,
        sample_ids: Sequence[str] | None = None,
        tokens: Sequence[Sequence[str]] | None = None,
        segments: Sequence[Sequence[tuple[str, int, int]]] | None = None,
        extra: Sequence[dict] | None = None,
        token_ids: Sequence[Sequence[int]] | None = None,
    ) -> None:
        """Name the samples of the next forward call (ids, token strings, segments, extra JSON-able info, and for
        a forward on `inputs_embeds` the vocabulary id behind each position, -1 where there is none).

        Tokens, segments and token ids index the sample's own (unpadded) positions. A forward on `input_ids`
        records its ids itself.
        """
        self._next = {"sample_ids": sample_ids, "tokens": tokens, "segments": segments, "extra": extra,
                      "token_ids": token_ids}

    # -------------------------------------------------------------------------------------------------- hooks
    def _on_body_start(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = input_ids if input_ids is not None else embeds
        if ref is None:
            raise RecorderError("the recorded forward got neither input_ids nor inputs_embeds")
        b, t = ref.shape[:2]
        if b == 0 or t == 0:
            name = "input_ids" if input_ids is not None else "inputs_embeds"
            raise RecorderError(f"the recorded forward got an empty batch ({name} of shape {tuple(ref.shape)}); a "
                                "recorded sample needs at least one token")
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise RecorderError("the recorder needs a 2D [batch, seq] attention_mask (or none)")
        if kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
                raise RecorderError("the recorder records full forward passes; a filled KV cache was passed")
        if ref.device.type == "cpu":
            _malloc.tune()  # once per process: see sinkscope.record._malloc
        if mask is None:  # no copy back from the device for a mask of ones
            valid, valid_np = torch.ones(b, t, dtype=torch.bool, device=ref.device), np.ones((b, t), dtype=bool)
        else:
            valid = mask.to(ref.device).bool()
            valid_np = valid.cpu().numpy()  # once per forward, before any of its work is queued
            empty = np.flatnonzero(~valid_np.any(axis=1))
            if len(empty):
                raise RecorderError(f"sample {int(empty[0])} of this batch of {b} has no real tokens (its "
                                    "attention_mask row is all zeros); a recorded sample needs at least one: drop it "
                                    "from the batch")
        self._cur = {
            "valid": valid,
            "valid_np": valid_np,
            "query_count": _query_count(valid_np),  # [B, T], alpha's denominator
            "query_valid": None if valid_np.all() else valid,
            "device_path": attn_fn.kernels.available(ref.device),
            # copied with valid_np's synchronisation, before any of this forward's work is queued
            "input_ids_np": None if input_ids is None else input_ids.detach().cpu().numpy(),
            "colsum": [None] * self.n_layers,
            "maps": {},
            "attn_out": [None] * self.n_layers,
            "mlp_out": [None] * self.n_layers,
            "layers": [None] * self.n_layers,
            "massive": [],
        }
        self._cur["first"] = (valid.int().argmax(dim=1) if mask is not None  # each row's first real position
                              else torch.zeros(b, dtype=torch.int64, device=ref.device))
        # the CPU's fused reductions (C: record/fused_cpu.c) write every layer's fields, and alpha, into
        # sample-major blocks
        self._cur["fused"] = not self._cur["device_path"] and ref.device.type == "cpu" and fused_cpu.available()
        if self._cur["fused"]:
            self._cur["host"] = _host_blocks(b, t, self.n_layers, self.n_heads, self.hidden_size, self.top_k)
            self._cur["massive_block"] = fused_cpu.MassiveBlock(max(4096, b * t))  # grows if a forward has more
        if self._cur["device_path"]:
            # the buffers the kernels write (one layer buffer, reused in stream order: each layer's copy to the
            # host is queued before the next layer's kernels write it), the forward's inputs to them and the plan
            # that repeats a layer's launches at the others: kept for the next forward of this shape
            state = self._device_state_for(b, t, ref.device, self._cur["query_valid"] is not None)
            state.massive[0].zero_()
            if state.valid is not None:  # padded: this forward's mask, first real positions and real tokens
                state.valid.copy_(valid)
                state.first.copy_(self._cur["first"])
                torch.sum(valid, dim=1, dtype=torch.int32, out=state.real_tokens)  # the median's n
                self._cur["query_valid"] = state.valid
            self._cur["first"] = state.first
            self._cur["real_tokens"] = state.real_tokens
            self._cur["massive_buffers"] = state.massive
            self._cur["layout"] = state.layout
            self._cur["state"] = state
            self._cur["plan"] = state.plan if attn_fn.kernels.LAYER_PLAN else None
            self._cur["buffer"] = [None] * self.n_layers
            # every layer's results go to one pinned host block [L, N], a copy per layer queued without waiting,
            # then into sample-major blocks ([B, L, ...]) at the end of the forward
            layout = self._cur["layout"]
            if state.landing is None:  # kept with the state: its unpacking views are made once per shape
                state.landing = torch.empty((self.n_layers, layout.total - layout.feat), dtype=torch.float32,
                                            pin_memory=ref.is_cuda)
                state.landing_views = _landing_views(state.landing, layout)
                state.landing_rows = state.landing.unbind(0)
            self._cur["landing"] = state.landing
            self._cur["landing_rows"] = state.landing_rows
            self._cur["events"] = [None] * self.n_layers
            self._cur["host"] = _host_blocks(b, t, self.n_layers, self.n_heads, self.hidden_size, self.top_k)
            if ref.is_cuda and PREFAULT:  # its pages faulted in by a thread while the GPU forward is queued
                self._cur["prefault"] = _prefault_pool().submit(_touch_pages, self._cur["host"])

    def _device_state_for(self, b: int, t: int, device: torch.device, padded: bool) -> _DeviceState:
        """The device path's buffers and launch plan for forwards of `b` x `t` tokens (with or without padding) on
        `device` with this recorder's top_k and thresholds (which the plan's recorded scalars hold): the last
        forward's when it had the same, else new ones (the old ones freed). Kept while the recorder lives, also
        between `with` blocks, so that a loop of forwards of one shape reuses them (on the device about 15 MB at the
        1B shape, T=32768: an 8 MB layer buffer and 7 MB for the massive entries; on the host the pinned landing
        block, one layer buffer's results a layer: 132 MiB there, 265 MiB at the 8B shape, which torch's pinned-memory
        cache held on to anyway when each forward allocated its own)."""
        kernels = attn_fn.kernels
        key = (device, b, t, padded, self.top_k, self.abs_threshold, self.rel_threshold)
        state = self._device_state
        if state is None or state.key != key:
            self._device_state = state = None  # the old buffers go before the new ones are allocated
            layout = kernels.layer_layout(b, t, self.hidden_size, self.n_heads, self.top_k)
            buf = kernels.layer_buffer(layout, device)
            state = self._device_state = _DeviceState(
                key, layout, buf, kernels.colsum_view(buf, layout), kernels.massive_buffers(b, t, device),
                torch.zeros(b, dtype=torch.int64, device=device),
                torch.empty(b, t, dtype=torch.bool, device=device) if padded else None,
                torch.empty(b, dtype=torch.int32, device=device) if padded else None,
                kernels.LayerPlan())
        graphs = kernels.CUDA_GRAPHS and device.type == "cuda" or kernels.GRAPH_CAPTURE is not None
        if graphs and state.graphs is None:
            state.graphs = kernels.LaunchGraphs(device, kernels.GRAPH_CAPTURE)
        state.plan.graphs = state.graphs if graphs else None
        return state

    def _attention_request(self, module) -> _Request | None:
        layer = self._attn_index.get(id(module))
        if layer is None:  # another model's attention: the recorder active on it, if any (two models compared)
            return self._previous_handler(module) if self._previous_handler is not None else None
        if self._cur is None:
            return None
        heads = self._map_heads[layer]

        def deliver(colsum, maps, layer=layer):
            # None: the column sums were written to the layer's device buffer (request.colsum_out)
            cur = self._cur
            if colsum is not None and cur["fused"]:  # alpha straight into the sample-major block
                np.divide(colsum.numpy(), cur["query_count"][:, None, :], out=cur["host"]["alpha"][:, layer])
                cur["colsum"][layer] = _IN_BUFFER
            else:
                cur["colsum"][layer] = _IN_BUFFER if colsum is None else self._keep(colsum, "colsum", layer)
            for h, m in maps.items():
                self._cur["maps"][(layer, h)] = m.cpu()

        colsum_out = None
        if self._cur["device_path"]:  # one device buffer for everything a layer records (kernels.layer_layout)
            state = self._cur["state"]
            self._cur["buffer"][layer] = state.buf
            colsum_out = state.colsum_view
        return _Request(self._cur["query_valid"], heads, deliver, self.compile, self._cur["device_path"], colsum_out,
                        self._windows[layer], self._cur.get("plan"), layer)

    def _store(self, name: str, layer: int, scale: float = 1.0):
        def hook(module, args, output):
            if self._cur is not None:
                x = attn_fn.detached(first_output(output))
                self._cur[name][layer] = x if scale == 1.0 else x * scale

        return hook

    def _on_block_end(self, layer: int):
        def hook(module, args, output):
            if self._cur is not None:
                h = attn_fn.detached(first_output(output))
                if not self._split_checked and layer == 0:
                    attn_fn.without_grad(self._check_split, layer, self._cur.pop("block_input", None), h)
                attn_fn.without_grad(self._reduce_layer, layer, h)

        return hook

    def _block_input(self, module, args, kwargs):
        if self._cur is not None and not self._split_checked:
            x = args[0] if args else kwargs.get("hidden_states")
            if isinstance(x, torch.Tensor):
                self._cur["block_input"] = x.detach()

    def _check_split(self, layer: int, x: torch.Tensor | None, h: torch.Tensor) -> None:
        """Once per recorder, at the first block it sees: is the block's update `h - x` the sum of the recorded
        `attn_out` and `mlp_out` (`blocks.block_contributions`)? On the first few tokens, to 2 % of the update's
        largest entry (bf16 rounding is 0.4 %). A block that adds something else (another norm, a scale, a third
        branch) gets a warning: the attention / MLP split of massive activations (`attn_share`, `mlp_share`) and
        `mlp_*` fields then do not describe its updates. One host synchronisation on a GPU, in the first forward."""
        self._split_checked = True
        a, m = self._cur["attn_out"][layer], self._cur["mlp_out"][layer]
        if x is None or a is None or m is None or not a.shape == m.shape == x.shape == h.shape:
            return
        rows = min(4, h.shape[1])
        delta = (h[:, :rows] - x[:, :rows]).float()
        err = float((delta - a[:, :rows].float() - m[:, :rows].float()).abs().max())
        scale = float(delta.abs().max())
        self.split_exact = err <= 0.02 * scale + 1e-6
        if not self.split_exact:
            block = self.layers[layer]
            warnings.warn(f"sinkscope: {type(block).__name__}'s update is not the sum of the outputs the recorder "
                          f"hooks ({err:.3g} off, against updates up to {scale:.3g}): an architecture whose blocks add "
                          "something else, or a hook that edits the block's output (an intervention, an adapter on "
                          "the whole block). The attention / MLP split of massive activations (attn_share, "
                          "mlp_share, attn_out, mlp_out) and the mlp_* fields do not describe its updates",
                          RuntimeWarning, stacklevel=2)

    def _reduce_layer(self, layer: int, h: torch.Tensor) -> None:
        cur = self._cur
        a, m = cur["attn_out"][layer], cur["mlp_out"][layer]
        if a is None or m is None:
            raise RecorderError(f"block {layer} did not run its self_attn and mlp submodules through forward()")
        if cur["device_path"]:
            buf = cur["buffer"][layer]
            if buf is None:
                raise RecorderError(f"block {layer}'s attention did not run through the attention interface")
            host = attn_fn.kernels.reduce_layer_device(
                h, a, m, buf, cur["layout"], cur["first"], cur["query_valid"], cur["real_tokens"], layer,
                (self.abs_threshold, self.rel_threshold), cur["massive_buffers"], plan=cur["plan"])
            cur["landing_rows"][layer].copy_(host, non_blocking=True)  # one copy per layer, queued without waiting
            if host.is_cuda:
                cur["events"][layer] = event = torch.cuda.Event()
                event.record()
            cur["layers"][layer] = True
            cur["buffer"][layer] = None
        else:
            # the two C passes, into the host blocks (False: a NaN or infinity, or a sample without real tokens)
            done = cur["fused"] and fused_cpu.reduce_layer_cpu(
                h, a, m, cur["valid_np"], self.top_k, self.abs_threshold, self.rel_threshold, cur["host"], layer,
                cur["massive_block"])
            if not done:
                stats, massive = reduce_layer(h, a, m, cur["valid"], cur["query_valid"] is not None, self.top_k,
                                              self.abs_threshold, self.rel_threshold, first=cur["first"],
                                              workspace=cur.setdefault("workspace", {}))
                cur["massive"].extend((layer, *found) for found in massive)
                if cur["fused"]:
                    for key, x in stats.items():
                        cur["host"][key][:, layer] = x.numpy()
                else:
                    cur["layers"][layer] = {key: self._keep(x, key, layer) for key, x in stats.items()}
            if cur["fused"]:
                cur["layers"][layer] = True
        if layer in self.hidden_layers:
            cur.setdefault("hidden", {})[layer] = h.float().to(self.hidden_dtype).cpu()
        cur["attn_out"][layer] = cur["mlp_out"][layer] = None

    def _keep(self, x: torch.Tensor, key: str, layer: int) -> torch.Tensor:
        """A layer's result, kept until the end of the forward. CUDA: copied to pinned host memory without waiting.
        CPU: copied into one `[L, ...]` block per field, allocated at the first layer, so that no small long-lived
        tensor sits between the reductions' large temporaries in the C heap: glibc serves blocks below its dynamic
        mmap threshold (up to 32 MiB) from the heap, and such islands kept the freed space around them resident
        (at T = 2048 on SmolLM2, peak RSS 265-420 MiB above a plain forward's, issue 16)."""
        if x.is_cuda:
            return _to_host(x)
        store = self._cur.setdefault("store", {})
        if key not in store:
            store[key] = x.new_empty((self.n_layers, *x.shape))
        store[key][layer].copy_(x)
        return store[key][layer]

    @torch.no_grad()
    def _on_body_end(self, module, args, output) -> None:
        cur = self._cur
        if cur is None:
            return
        missing = [i for i in range(self.n_layers) if cur["colsum"][i] is None or cur["layers"][i] is None]
        if missing:
            raise RecorderError(f"layers {missing} were not recorded: the model bypassed the attention "
                                "interface or the decoder blocks")
        valid, valid_np, count = cur["valid"], cur["valid_np"], cur["query_count"]
        # what needs no result of this forward first (ids, token strings, segments): on a GPU that is still busy
        # with the last layers this costs nothing, where after the waits below it added to the wall time (1.6-1.8
        # ms of token strings at T = 8192, session 15's profile)
        meta = self._next
        self._next = {}
        input_ids = cur["input_ids_np"]
        heads = [self._sample_head(b, valid_np[b], input_ids, meta) for b in range(valid_np.shape[0])]
        if cur["device_path"]:  # unpacked while the GPU finishes the last layers, in runs of landed layers
            touched = "prefault" in cur
            if touched:
                cur.pop("prefault").result()
            _unpack_layers(cur["landing"], cur["events"], cur["layout"], cur["host"], count,
                           [c is _IN_BUFFER for c in cur["colsum"]], touched, cur["state"].landing_views)
        if valid.is_cuda:  # the other copies to pinned host memory were queued without waiting: wait once
            torch.cuda.current_stream(valid.device).synchronize()
        if cur["device_path"] or cur["fused"]:
            per_layer = dict(cur["host"])
            alpha = per_layer.pop("alpha")
            for layer, colsum in enumerate(cur["colsum"]):
                if colsum is not _IN_BUFFER:  # a layer whose attention took the torch path (full maps asked for)
                    np.divide(colsum.numpy(), count[:, None, :], out=alpha[:, layer])
        else:
            # sample-major blocks ([B, L, ...]), so that each sample's fields are contiguous views, not B copies
            alpha = np.stack([c.numpy() for c in cur["colsum"]], axis=1)  # [B, L, H, T]
            alpha /= count[:, None, None, :]
            per_layer = {k: np.stack([d[k].numpy() for d in cur["layers"]], axis=1) for k in cur["layers"][0]}
        massive = [_massive_to_numpy(rec) for rec in cur["massive"]]
        if "massive_buffers" in cur:
            massive.append(_device_massive(*cur["massive_buffers"]))
        if "massive_block" in cur:
            massive.append(cur["massive_block"].arrays())
        if self.routing is not None:
            missing = [i for i in range(self.n_layers) if i not in self.routing.routing]
            if missing:
                raise RecorderError(f"the MoME router of layers {missing} did not run in this forward")
            cur["router"] = tuple(torch.stack([self.routing.routing[i][key] for i in range(self.n_layers)])
                                  .cpu().numpy() for key in ("ids", "gates"))  # [L, B, T, k] each
        frames = _massive_per_sample(massive, valid_np)
        for b, head in enumerate(heads):
            self.samples.append(self._sample(b, head, alpha, per_layer, frames[b], cur, meta))
        self._cur = None
        if not valid.is_cuda:
            _malloc.trim()  # the layers' freed heap back to the kernel before the logits (see _malloc.trim)

    def _sample_head(self, b, valid, input_ids, meta) -> dict:
        """What sample b of a forward takes from its inputs alone: its real positions, tokens and segments."""
        idx = np.flatnonzero(valid)
        n = len(idx)
        sel = slice(int(idx[0]), int(idx[-1]) + 1) if n and idx[-1] - idx[0] + 1 == n else idx  # views, no copy
        ids = None if input_ids is None else input_ids[b, idx]
        tokens = self._tokens(b, n, ids, meta)
        segments = _pick(meta, "segments", b) or _default_segments(ids, n, self.hf_model.config)
        token_ids = ids if ids is not None else _pick(meta, "token_ids", b)
        if token_ids is not None:
            token_ids = np.asarray(token_ids, dtype=np.int64)
            if token_ids.shape != (n,):
                raise RecorderError(f"annotate_next gave {token_ids.size} token ids for sample {b}, which has {n}")
        return {"idx": idx, "sel": sel, "tokens": tokens, "segments": segments, "token_ids": token_ids}

    def _sample(self, b, head, alpha, per_layer, massive, cur, meta) -> SampleRecord:
        idx, sel, tokens, segments = (head[k] for k in ("idx", "sel", "tokens", "segments"))
        sample_id = _pick(meta, "sample_ids", b) or f"s{self._counter:06d}"  # numbered once the forward succeeded
        self._counter += 1
        hidden = {layer: arr[b, idx].numpy() for layer, arr in cur.get("hidden", {}).items()}
        maps = {key: arr[b][np.ix_(idx, idx)].numpy() for key, arr in cur["maps"].items()}
        return SampleRecord(
            sample_id=str(sample_id),
            tokens=tokens,
            segments=[(str(s), int(a), int(e)) for s, a, e in segments],
            attention_received=np.ascontiguousarray(alpha[b][..., sel], dtype=np.float32),
            bos_cosine=np.ascontiguousarray(per_layer["bos_cosine"][b][:, sel], dtype=np.float32),
            max_abs=np.ascontiguousarray(per_layer["max_abs"][b][:, sel], dtype=np.float32),
            median_abs=per_layer["median_abs"][b].astype(np.float32, copy=False),
            massive=massive,
            feature_max_abs=per_layer["feature_max_abs"][b].astype(np.float32, copy=False),
            mlp_feature_max_abs=per_layer["mlp_feature_max_abs"][b].astype(np.float32, copy=False),
            top_features=np.ascontiguousarray(per_layer["top_features"][b][:, sel], dtype=np.int32),
            top_values=np.ascontiguousarray(per_layer["top_values"][b][:, sel], dtype=np.float32),
            mlp_top_features=np.ascontiguousarray(per_layer["mlp_top_features"][b][:, sel], dtype=np.int32),
            mlp_top_values=np.ascontiguousarray(per_layer["mlp_top_values"][b][:, sel], dtype=np.float32),
            attention_maps=maps,
            hidden_states=hidden,
            extra=dict(_pick(meta, "extra", b) or {}),
            router_ids=None if "router" not in cur else cur["router"][0][:, b][:, idx].astype(np.int32),
            router_gates=None if "router" not in cur else cur["router"][1][:, b][:, idx].astype(np.float32),
            token_ids=head["token_ids"],
        )

    def _tokens(self, b: int, n: int, ids, meta) -> list[str]:
        given = _pick(meta, "tokens", b)
        if given is not None:
            if len(given) != n:
                raise RecorderError(f"annotate_next gave {len(given)} tokens for sample {b}, which has {n}")
            return [str(t) for t in given]
        if ids is None:
            return ["<embed>"] * n
        if self.tokenizer is None:
            return list(map(str, np.asarray(ids).tolist()))
        # each id decoded once per recorder: a decode call per position cost 10 ms per 2,048 SmolLM2 tokens here
        known, ids = self._token_text, np.asarray(ids).tolist()
        for i in set(ids) - known.keys():
            known[i] = self.tokenizer.decode([i])
        return [known[i] for i in ids]

    # --------------------------------------------------------------------------------------------------- saving
    def manifest(self, config: dict | None = None) -> dict:
        """The manifest fields that describe this recording."""
        config = config or {}
        name = getattr(self.hf_model.config, "_name_or_path", "") or type(self.hf_model).__name__
        return {
            "model": str(config.get("model") or name),
            "model_class": type(self.hf_model).__name__,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "hidden_size": self.hidden_size,
            "thresholds": {"massive_abs": self.abs_threshold, "massive_rel": self.rel_threshold,
                           "sink_eps": SINK_EPS, "sink_head_fraction": SINK_HEAD_FRACTION,
                           "sink_min_queries": MIN_QUERIES},
            "top_k": self.top_k,
            "config": config,
        }

    def save(self, path: str | os.PathLike, config: dict | None = None) -> Path:
        """Write the samples not yet written to the trace at `path` (created, or appended to)."""
        writer = TraceWriter(path, self.manifest(config))
        key = str(writer.path.resolve())
        for sample in self.samples[self._saved.get(key, 0):]:
            writer.append(sample)
            self._saved[key] = self._saved.get(key, 0) + 1
        return writer.path


_SWITCHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""model -> the configs whose attention implementation the last switch to sinkscope changed: (config, before,
after). transformers' `set_attn_implementation` walks every submodule and checks the model's source each time
(1-3 ms a call, twice per `with Recorder(...)`); once it has run, the same switch is replayed directly."""


def _switch_attention(model, implementation: str) -> list | None:
    """Set `model`'s attention implementation. Returns the changes made, as (config, before, after), so that
    they can be undone exactly; None when transformers keeps the setting elsewhere (then the caller restores
    with `set_attn_implementation`)."""
    if not hasattr(model.config, "_attn_implementation_internal"):
        model.set_attn_implementation(implementation)
        return None
    cached = _SWITCHES.get(model)
    if cached and all(config._attn_implementation_internal == before for config, before, _ in cached):
        for config, _, after in cached:
            config._attn_implementation_internal = after
        if model.config._attn_implementation == implementation:
            return cached
        for config, before, _ in cached:  # the replay did not take: undo it, then switch the slow way
            config._attn_implementation_internal = before
    configs = {id(model.config): model.config}
    for module in model.modules():
        config = getattr(module, "config", None)
        if hasattr(config, "_attn_implementation_internal"):
            configs.setdefault(id(config), config)
    queue = list(configs.values())
    while queue:  # sub-configs, at any depth
        parent = queue.pop()
        for name in getattr(parent, "sub_configs", None) or {}:
            sub = getattr(parent, name, None)
            if hasattr(sub, "_attn_implementation_internal") and id(sub) not in configs:
                configs[id(sub)] = sub
                queue.append(sub)
    before = [(config, config._attn_implementation_internal) for config in configs.values()]
    model.set_attn_implementation(implementation)
    changes = [(config, old, config._attn_implementation_internal) for config, old in before
               if config._attn_implementation_internal != old]
    _SWITCHES[model] = changes
    return changes


def _query_count(valid: np.ndarray) -> np.ndarray:
    """`[B, T]` float32: the number of real queries i >= k that see key k (at least 1), alpha's denominator."""
    return np.maximum(valid[:, ::-1].cumsum(1)[:, ::-1], 1).astype(np.float32)


def _host_blocks(b: int, t: int, n_layers: int, heads: int, hidden: int, top_k: int) -> dict[str, np.ndarray]:
    """The device path's per-forward results on the host, sample-major: alpha `[B, L, H, T]` and the per-layer
    fields `[B, L, ...]` that `_unpack_layers` fills. All are views of one block that starts on a 2 MiB boundary,
    so that the kernel can back it with huge pages (numpy asks for them on large arrays): faulting in the fresh
    memory was most of the unpacking's cost, and separate arrays left a partial huge page at each end (session 16,
    this CPU, the 135M shape at T=8192, 40 MiB: 11.6 ms to unpack into separate arrays, 6.6 ms into one aligned
    block, 4.3 ms into memory already touched)."""
    words, fields = _host_block_plan(b, t, n_layers, heads, hidden, top_k)
    step = _HOST_ALIGN // 4  # in 4-byte words
    raw = np.empty(words + step, dtype=np.float32)
    pos = (-(raw.ctypes.data // 4)) % step
    return {name: raw[pos + start: pos + start + size].view(dtype).reshape(shape)
            for name, start, size, shape, dtype in fields}


@functools.lru_cache(maxsize=16)
def _host_block_plan(b: int, t: int, n_layers: int, heads: int, hidden: int, top_k: int) -> tuple[int, tuple]:
    """`_host_blocks`' layout for one shape (kept: a forward of a known shape only allocates and cuts): its size in
    4-byte words and each field's (name, start word, words, shape, dtype), each field on a 64-byte boundary."""
    f32, i32 = np.float32, np.int32
    shapes = {"alpha": ((b, n_layers, heads, t), f32), "bos_cosine": ((b, n_layers, t), f32),
              "max_abs": ((b, n_layers, t), f32), "median_abs": ((b, n_layers), f32),
              "feature_max_abs": ((b, n_layers, hidden), f32), "mlp_feature_max_abs": ((b, n_layers, hidden), f32)}
    for name, dtype in (("top_features", i32), ("top_values", f32), ("mlp_top_features", i32),
                        ("mlp_top_values", f32)):
        shapes[name] = ((b, n_layers, t, top_k), dtype)
    fields, pos = [], 0
    for name, (shape, dtype) in shapes.items():
        size = int(np.prod(shape))
        fields.append((name, pos, size, shape, dtype))
        pos += -(-size // 16) * 16
    return pos, tuple(fields)


_HOST_ALIGN = 2 << 20
"""Where `_host_blocks` starts its block: a huge page's size (x86-64, 2 MiB)."""

PREFAULT = os.environ.get("SINKSCOPE_PREFAULT", "1") != "0"
"""On CUDA, a worker thread writes one byte of every page of a forward's fresh `_host_blocks` while the forward
is being queued, so that the end-of-forward unpacking copies into memory already faulted in. On the H200's host
(session 19, `bench.gpu --unpack`) the unpacking took 10.0 ms into fresh memory and 7.4 ms into touched memory at
the 135M shape, T=8192 (40 MiB), and it is wall time after the GPU is done wherever the host is the bottleneck;
in-process A/B there, this and the fast launch against neither: 2.15x against 2.33x of the plain forward. The
thread holds no lock the forward needs: numpy releases the GIL for the strided write, and the page faults happen
inside it.
`SINKSCOPE_PREFAULT=0` (read at import) leaves the pages to the unpacking."""

UNPACK_TORCH = os.environ.get("SINKSCOPE_UNPACK_TORCH", "1") != "0"
"""`_unpack_layers` copies and divides with torch instead of numpy (session 21): the same values bit for bit
(IEEE float32 division either way), but torch spreads a large copy over its intra-op threads, where numpy's runs
on one core. The copy is memory-bound, one core's bandwidth its limit: on the development CPU (2 threads) 3.0 ->
2.3 ms at the 1B shape, T=8192, 11.3 -> 8.6 ms at T=32768, 3.7 -> 3.4 ms at 135M T=8192 (one thread: no
difference), where the H200's host took 7.4 ms at 135M T=8192 with numpy, wall time after the GPU is done in
host-bound forwards (session 19's profile: the largest single item of a recorded forward's host time there).
Only into blocks the prefault thread has faulted in (on CUDA, `PREFAULT`): into fresh memory, torch's threads
faulting pages side by side took 38 against 6 ms at 135M T=8192 on the development CPU (one thread: 6.6 ms).
`SINKSCOPE_UNPACK_TORCH=0` (read at import) or False here: numpy, as before."""

_PAGE = 4096
_POOL: dict[int, Any] = {}


def _prefault_pool():
    """The prefault worker (one thread), one per process: a forked child gets its own, since the parent's thread
    does not exist there."""
    pool = _POOL.get(os.getpid())
    if pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL.clear()
        pool = _POOL[os.getpid()] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sinkscope-prefault")
    return pool


def _touch_pages(blocks: dict[str, np.ndarray]) -> None:
    """Fault in the pages of `_host_blocks`' block (one write per 4 KiB page; the values are overwritten later)."""
    raw = next(iter(blocks.values()))
    while isinstance(raw.base, np.ndarray):  # the block that every field is a view of
        raw = raw.base
    raw.reshape(-1).view(np.uint8)[:: _PAGE] = 0


def _landing_views(landing: torch.Tensor, layout) -> dict[str, tuple]:
    """The fields of every layer in the landing block `[L, N]`, sample-major (`[B, L, ...]`), as numpy views
    ("numpy") and as torch views ("torch"): `(fields, column sums)` each, for `_unpack_layers` to slice by layer
    (made once per landing block: 104 of 196 us a forward went to making them, 16 layers at T=16)."""
    fields, colsum = attn_fn.kernels.unpack_layer(landing, layout)  # [L, B, ...] views
    return {"torch": ({key: x.transpose(0, 1) for key, x in fields.items()}, colsum.transpose(0, 1)),
            "numpy": ({key: np.swapaxes(x.numpy(), 0, 1) for key, x in fields.items()},
                      np.swapaxes(colsum.numpy(), 0, 1))}


def _unpack_layers(landing: torch.Tensor, events: list, layout, out: dict[str, np.ndarray], count: np.ndarray,
                   colsum_in_buffer: list[bool], touched: bool = False, views: dict | None = None) -> None:
    """The device path's host side at the end of a forward: copy every layer's results from the pinned block
    `landing` `[L, N]` into the sample-major blocks `out` (`[B, L, ...]`; alpha = column sums / count), in runs
    of consecutive layers whose copies have landed (each run waits for its first layer's CUDA event, then takes
    every later layer already done), so that the host works while the GPU runs the last layers and each run costs
    a few numpy calls whatever its length. `events[l]` None: no GPU (the interpreter's CPU tests). `touched`:
    `out`'s pages are faulted in already (the prefault thread's work), and then, with UNPACK_TORCH, torch copies.
    `views`: `_landing_views(landing, layout)`, made here when not given."""
    use_torch = UNPACK_TORCH and touched
    divide, den = (torch.div, torch.from_numpy(count)) if use_torch else (np.divide, count)
    dst = {key: torch.from_numpy(x) for key, x in out.items()} if use_torch else out
    every_src, every_sum = (views or _landing_views(landing, layout))["torch" if use_torch else "numpy"]
    n, i = len(events), 0
    while i < n:
        if events[i] is not None:
            events[i].synchronize()
        j = i + 1
        while j < n and (events[j] is None or events[j].query()):
            j += 1
        # torch's copies and division (the same values as numpy's, over its intra-op threads), or numpy's
        sums = every_sum[:, i:j]  # [B, j - i, H, T]
        for key, x in every_src.items():  # [B, j - i, ...]
            dst[key][:, i:j] = x[:, i:j]
        if all(colsum_in_buffer[i:j]):  # alpha [B, j - i, H, T]
            divide(sums, den[:, None, None, :], out=dst["alpha"][:, i:j])
        else:  # some layers took the torch path (full maps asked for): the recorder divides theirs
            for k in range(i, j):
                if colsum_in_buffer[k]:
                    divide(sums[:, k - i], den[:, None, :], out=dst["alpha"][:, k])
        i = j


def _sliding_window(block) -> int | None:
    """A block's attention window: its attention module's own `sliding_window` where it has one (Gemma 3, Qwen2:
    None on their global layers), else its config's (Mistral: every layer)."""
    attn = block.self_attn
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(getattr(attn, "config", None), "sliding_window", None)


_IN_BUFFER = object()
"""Marks a layer whose column sums are in place already: written by the device path into its layer buffer, or
divided into the host block's alpha on the CPU's fused path."""


def _to_host(x: torch.Tensor) -> torch.Tensor:
    """A CUDA tensor's copy into pinned host memory, queued without waiting (read it only after the stream is
    synchronised, at the end of the forward); CPU tensors as they are."""
    return x.to("cpu", non_blocking=True) if x.is_cuda else x


def _massive_per_sample(massive: list[tuple], valid: np.ndarray) -> list:
    """One massive-records DataFrame per sample from a forward's records `(layer, batch, token, feature, value,
    attn_out, mlp_out)` (layer a scalar on the torch path, an array on the device path; token an absolute
    position, turned into the position within the sample)."""
    rel = np.cumsum(valid, axis=1) - 1  # [B, T]: absolute position -> position within the sample
    parts = [(np.full(len(mb), layer) if np.isscalar(layer) else layer, mb, t, j, v, a, m)
             for layer, mb, t, j, v, a, m in massive]
    layer, batch, token, feature, value, attn, mlp = ([np.concatenate(c) for c in zip(*parts, strict=True)] if parts
                                                      else [np.zeros(0, dtype=np.int64)] * 7)
    batch = batch.astype(np.int64)
    return massive_frames(batch, layer, rel[batch, token.astype(np.int64)], feature, value, attn, mlp,
                          n_samples=valid.shape[0])


def _massive_to_numpy(rec: tuple) -> tuple:
    """(layer, batch, token, feature, value, attn_out, mlp_out) of the torch path, as numpy."""
    layer, *arrays = rec
    return (layer, *[x.cpu().numpy() for x in arrays])


def _device_massive(count: torch.Tensor, ent_i: torch.Tensor, ent_v: torch.Tensor) -> tuple:
    """The device path's massive entries of a whole forward, from `kernels.massive_buffers`: one synchronisation
    at the end of the forward, the kept rows copied once, sorted by (layer, batch, token, feature) since the
    kernel appends them in whatever order its programs run. Refused when the buffer overflowed."""
    n = int(count.item())
    if n > ent_i.shape[0]:
        from sinkscope.record.reduce import MASSIVE_PER_TOKEN

        raise RecorderError(
            f"this forward has {n} massive entries, more than the {ent_i.shape[0]} the device path keeps "
            f"({MASSIVE_PER_TOKEN} per token of one layer on average): raise the thresholds (abs_threshold, "
            "rel_threshold) or record with SINKSCOPE_TRITON=0")
    idx, val = ent_i[:n].cpu().numpy(), ent_v[:n].cpu().numpy()
    order = np.lexsort(idx.T[::-1])  # by layer, then batch, token, feature
    idx, val = idx[order], val[order]
    return (idx[:, 0], idx[:, 1], idx[:, 2], idx[:, 3], val[:, 0], val[:, 1], val[:, 2])


def _pick(meta: dict, key: str, b: int):
    values = meta.get(key)
    return None if values is None else values[b]


def _default_segments(ids, n: int, config) -> list[tuple[str, int, int]]:
    bos = getattr(config, "bos_token_id", None)
    if ids is not None and n > 0 and bos is not None and int(ids[0]) == bos:
        return [("bos", 0, 1)] + ([("text", 1, n)] if n > 1 else [])
    return [("text", 0, n)]
