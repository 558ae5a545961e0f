"""Built-in passes, one per file. Importing this package registers them all by name."""

from graphopt.passes import (  # noqa: F401
    attention_canonical,
    attention_explicit,
    attention_lower,
    clamp_mask,
    concat_cache,
    cross_kv_inputs,
    encoder_padding_mask,
    fixed_mask,
    kv_layout,
    export_legalize,
    onnx_simplify,
    onnx_tidy,
    rope_table,
    sink_head_transpose,
    strip_trace_noise,
    views_to_reshapes,
)
