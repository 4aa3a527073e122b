"""Writes notebooks/03_mome_sinks_across_rates.ipynb from the cells below (run it, then execute the notebook)."""

from pathlib import Path

import nbformat

CELLS = [
    ("md", """# MoME: sinks, massive activations and experts across compression rates, in one model

The shipped MoME model (`--checkpoint mome-demo`: SmolLM2-135M, frozen, with mixture-of-experts adapters in
parallel to every MLP, LoRA, one avgpool projector; ASR trained at the audio rates K_a ∈ {4, 16, 32} at once)
transcribes held-out speakers of the synthetic GRID corpus at each of its rates. Because one set of weights serves
every rate, this notebook can ask what changes inside when **only the rate** changes:

1. WER at each rate, and where the sinks are (BOS, the `<audio>` delimiter, audio tokens, prompt).
2. The massive activations: which features, on which tokens, how large.
3. Cos-to-BOS of each segment, at a middle layer and the last.
4. The router: which experts each segment's tokens go to, with the sink tokens as their own row.
5. The same utterance at the lowest and the highest rate, side by side.

Set `SINKSCOPE_NB_UTTERANCES` to change how many held-out utterances are recorded at each rate (the tests run 4)."""),
    ("code", """import os
import tempfile
from pathlib import Path

import pandas as pd
import torch

from sinkscope import analysis, viz
from sinkscope.data.synth import SynthConfig, synthesize
from sinkscope.eval import score
from sinkscope.models.avsr import AVSRModel, dataset_for
from sinkscope.record.run import record_avsr
from sinkscope.trace import Trace
from sinkscope.trace.columns import token_segments

N = int(os.environ.get("SINKSCOPE_NB_UTTERANCES", "40"))
torch.manual_seed(0)
model = AVSRModel.from_pretrained(os.environ.get("SINKSCOPE_MOME", "mome-demo"))
corpus = Path(os.environ.get("SINKSCOPE_CORPUS", "")) if os.environ.get("SINKSCOPE_CORPUS") else None
if corpus is None:  # held-out speakers (spk08, spk09) only appear in the test split
    corpus = Path(tempfile.mkdtemp()) / "grid"
    synthesize(corpus, SynthConfig(n=max(100, 5 * N), seed=1), workers=2)
test = dataset_for(model.cfg, corpus, "test", limit=N)
rates = model.cfg.rate_set
print(f"{len(test)} held-out utterances from {corpus}; {model.cfg.mode} at rates "
      f"{[r[0] if model.cfg.mode == 'asr' else r for r in rates]}; "
      f"{model.cfg.mome.experts} routed experts (top {model.cfg.mome.top_k}) + {model.cfg.mome.shared} shared per layer")"""),
    ("md", """## 1. Record the same utterances at every rate
Each rate gets its own trace (the recorder keeps the router's top-k expert ids and gates per layer and token);
each sample also carries the model's greedy hypothesis and its WER."""),
    ("code", """out = Path(os.environ.get("SINKSCOPE_NB_OUT") or tempfile.mkdtemp())
traces = {}
for index, rate in enumerate(rates):
    model.set_rate(index)
    name = f"K_a={rate[0]}" if model.cfg.mode == "asr" else f"K_v={rate[1]}" if model.cfg.mode == "vsr" else \\
        f"K_a={rate[0]},K_v={rate[1]}"
    record_avsr(model, test, out / name.replace("=", "").replace(",", "-"), batch_size=8,
                config={"rate": list(rate)})
    traces[name] = Trace.load(out / name.replace("=", "").replace(",", "-"))
model.set_rate(0)

rows = []
for name, trace in traces.items():
    s = score([x.extra["transcript"] for x in trace], [x.extra["hypothesis"] for x in trace])
    print(f"{name}: WER {100 * s['wer']:.1f} % on {s['n']} utterances")
    sinks = analysis.dataset_sinks(trace)
    frequent = sinks[sinks.layers >= 10] if "layers" in sinks else sinks
    rows.append({"rate": name, "tokens": round(sum(len(x.tokens) for x in trace) / len(trace), 1),
                 "WER %": round(100 * s["wer"], 1), "CER %": round(100 * s["cer"], 1),
                 "sinks (>=10 layers) per utterance": round(len(frequent) / len(trace), 2),
                 "their segments": ", ".join(f"{k} {v}" for k, v in frequent.segment.value_counts().items())})
pd.DataFrame(rows).set_index("rate")"""),
    ("md", """## 2. Massive activations at each rate
Every massive record (|h| ≥ max(100, 1000 × median |h|), Sun et al.) of every utterance: on which segment, which
features, from which layer, and how large."""),
    ("code", """rows = []
for name, trace in traces.items():
    m = analysis.trace_massive(trace)
    segments = {x.sample_id: token_segments(x.segments, len(x.tokens)) for x in trace}
    m["segment"] = [segments[sid][tok] for sid, tok in zip(m["sample"], m["token"], strict=True)]
    if not len(m):
        rows.append({"rate": name, "records": 0})
        continue
    rows.append({"rate": name, "records": len(m), "per utterance": round(len(m) / len(trace), 1),
                 "features": ", ".join(str(f) for f in m.feature.value_counts().index[:4]),
                 "segments": ", ".join(f"{k} {v}" for k, v in m.segment.value_counts().items()),
                 "first layer": int(m.layer.min()), "max |h|": round(float(m.value.abs().max()), 1)})
pd.DataFrame(rows).set_index("rate")"""),
    ("md", """## 3. Cos-to-BOS by segment
The mean cosine between each token's residual stream and BOS's, by segment, at a middle layer and the last
(sink tokens are expected to be nearly parallel to BOS)."""),
    ("code", """L = traces[next(iter(traces))].manifest["n_layers"]
rows = []
for name, trace in traces.items():
    for layer in (L // 2, L - 1):
        cos = analysis.dataset_cosine(trace, layer).groupby("segment").cos.mean()
        rows.append({"rate": name, "layer": layer, **{k: round(float(v), 3) for k, v in cos.items()}})
pd.DataFrame(rows).set_index(["rate", "layer"])"""),
    ("md", """## 4. Which experts each segment uses
The share of each segment's router gate mass that goes to each routed expert, at a middle layer; the `sinks` row
holds the tokens that are sinks at that layer, whatever their segment. One router serves every rate
(`shared_router: true`), so differences between rates come from the inputs alone."""),
    ("code", """layer = L // 2
tables = {name: analysis.expert_usage(trace, layer) for name, trace in traces.items()}
for name, table in tables.items():
    print(name)
    print(table.round(3).to_string(), end="\\n\\n")
first = next(iter(tables))
viz.expert_usage_figure(tables[first], layer).update_layout(title=f"Expert usage at layer {layer}, {first}").show()"""),
    ("md", """## 5. One utterance at the lowest and the highest rate
The same utterance through the same weights: attention received per layer and token at K = first and last
rate of the set. The token axis is shorter at the higher rate (fewer audio tokens)."""),
    ("code", """names = list(traces)
a, b = traces[names[0]][0], traces[names[-1]][0]
print(f"{a.sample_id}: {a.extra['transcript']!r}")
for name, s in ((names[0], a), (names[-1], b)):
    print(f"  {name}: {len(s.tokens)} tokens, hypothesis {s.extra['hypothesis']!r} (WER {s.extra['wer']:.2f})")
viz.side_by_side(viz.received_attention_heatmap(a), viz.received_attention_heatmap(b), (names[0], names[-1])).show()
viz.side_by_side(viz.cosine_heatmap(a), viz.cosine_heatmap(b), (names[0], names[-1])).show()"""),
    ("md", """## What this run shows (12 held-out utterances, the committed outputs above)
- **WER rises with compression** in the one model: 16.7 / 18.1 / 19.4 % at K_a = 4 / 16 / 32 here (19.6 / 22.5 /
  24.3 % on the 200-utterance test set of `experiments/results/mome.csv`).
- **The sinks do not move with the rate**: BOS and the `<audio>` delimiter are sinks in at least 10 layers in every
  utterance at every rate, and nothing else is. This is partly structural: both precede the audio tokens, so under
  causal attention their own states are the same at every rate (the same massive feature 507 from layer 11, the
  same largest |h|, 27,048). What the rate can change is how much the later tokens attend to them.
- **The massive-record counts differ slightly** (419 / 409 / 408) although the sink states are identical: the
  threshold is relative to each sample's median |h|, which includes the audio tokens, so borderline entries of
  `<audio>` pass it at K_a = 4 only.
- **Cos-to-BOS of the audio tokens grows with compression** at the middle layer (0.47 → 0.52 → 0.56) and at the
  last (0.18 → 0.21 → 0.23): fewer, pooled audio tokens sit closer to the sink direction. `<audio>` itself is
  parallel to BOS (1.000 at layer 15).
- **The sink tokens have their own experts**: at layer 15, BOS and `<audio>` send all their gate mass to experts 1
  and 2 (about 0.51 / 0.49), which the other segments use little (the prompt goes to expert 0, the transcript to
  experts 3 and 1). As the rate grows, the audio tokens move towards expert 2 (35 → 55 → 61 % of their gate
  mass), the expert they share with the sinks."""),
]

nb = nbformat.v4.new_notebook()
nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
            for kind, src in CELLS]
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
path = Path(__file__).resolve().parents[1] / "03_mome_sinks_across_rates.ipynb"
nbformat.write(nb, path)
print(path)
