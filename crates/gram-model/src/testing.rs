//! Helpers of gram-model's unit tests.

use gram_core::ModelConfig;

/// A two-layer LLaMA small enough for finite differences.
pub(crate) fn tiny_config(tied: bool) -> ModelConfig {
    let v = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16,
        "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 40, "max_position_embeddings": 32,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": tied
    });
    ModelConfig::from_hf_json(&v, std::path::Path::new("tiny")).expect("a valid config")
}
