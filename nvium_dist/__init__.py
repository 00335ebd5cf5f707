"""nvium_dist: N-vium mixture-of-exits transformers on megatron-core and DeepSpeed."""
import warnings

# megatron-core announces at import that optional fused kernels (apex / Transformer Engine) are absent;
# that is the expected state on CPU and says nothing actionable.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message=".*tp_group is None.*")
