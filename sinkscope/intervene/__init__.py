"""Interventions: ablate massive features, block attention to sinks, rotate states relative to BOS.

The tensor edits are written once (`edits`); `hf` applies them with HF forward hooks (any HF decoder, peft or
not, with `input_ids` or `inputs_embeds`, through `generate()`), `lens` with TransformerLens 4 hooks on a
`TransformerBridge`, and `decode_under` decodes an AVSR model under an intervention chosen per batch.
"""

from sinkscope.intervene.decode import decode_under
from sinkscope.intervene.edits import rotate_toward
from sinkscope.intervene.hf import ablate_features, block_attention, next_token_loss, rotate_states

__all__ = ["ablate_features", "block_attention", "decode_under", "next_token_loss", "rotate_states", "rotate_toward"]
