"""Plotly figure builders shared by the Streamlit app and the notebooks, one module per view family.

Every function takes trace samples (or tables from `sinkscope.analysis`) and returns a `plotly` Figure; none
computes metrics of its own. Token axes are banded by segment and hovering shows the token text. Long sequences
are decimated by max-pooling along the token axis, which keeps sink columns visible, and the first tokens are
always kept at full resolution; pass `token_range` to zoom to full resolution.

    axes        token bins, pooling, hover labels, segment bands, the layer x token heatmap
    attention   attention received, head grid, full maps, sink rate by segment
    massive     top activations, ranked top-k features x layers, a feature's trajectory across layers, tokens x
                features, Jaccard, origin
    cosine      cosine to BOS
    compare     differences between two traces
    grid        single-panel figures as the panels of one figure (one browser chart instead of several)
    dataset     whole-trace distributions
"""

from sinkscope.segments import SEGMENT_COLORS, segment_color
from sinkscope.viz.attention import attention_map, head_grid, received_attention_heatmap, sink_rate_by_segment_figure
from sinkscope.viz.axes import add_segment_bands, esc, pool_tokens, token_bins, token_labels
from sinkscope.viz.compare import (
    difference_heatmap,
    massive_feature_comparison,
    profile_figure,
    side_by_side,
    sink_position_comparison,
)
from sinkscope.viz.cosine import cosine_by_segment_figure, cosine_heatmap, segment_profile_figure
from sinkscope.viz.dataset import cosine_distribution_figure, massive_feature_histogram, sink_positions_figure
from sinkscope.viz.grid import panel_grid
from sinkscope.viz.massive import (
    expert_usage_figure,
    feature_trajectory_figure,
    jaccard_figure,
    origin_figure,
    token_feature_heatmap,
    top_activations_figure,
    top_features_figure,
)

__all__ = [
    "expert_usage_figure",
    "SEGMENT_COLORS", "add_segment_bands", "attention_map", "cosine_by_segment_figure",
    "cosine_distribution_figure", "cosine_heatmap", "difference_heatmap", "esc", "feature_trajectory_figure",
    "head_grid", "jaccard_figure", "massive_feature_comparison", "massive_feature_histogram", "origin_figure",
    "panel_grid", "pool_tokens", "profile_figure", "received_attention_heatmap", "segment_color", "side_by_side",
    "segment_profile_figure", "sink_position_comparison", "sink_positions_figure", "sink_rate_by_segment_figure",
    "token_bins",
    "token_feature_heatmap", "token_labels", "top_activations_figure", "top_features_figure",
]
