"""A zoo of tiny random-weight models, one per architecture family transformers ships: what the
coverage tests and ``benchmarks/model_zoo.py`` (which writes ``docs/models.md``) run every preset
on. Hidden size 128, 2 layers, vocabulary 256: group-wise formats divide every dimension, and
nothing is downloaded.

    build("mixtral") -> (model in eval mode, example input dict)
"""
from __future__ import annotations

from typing import Any, Callable

import torch

H, I, V = 128, 256, 256
_DEC = dict(hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=V, max_position_embeddings=256)


def _configs() -> dict[str, Callable[[], Any]]:
    import transformers as tf

    return {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_DEC)),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**_DEC)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_DEC)),
        "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**_DEC, head_dim=32)),
        "phi": lambda: tf.PhiForCausalLM(tf.PhiConfig(**_DEC)),
        "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**_DEC, pad_token_id=0)),
        "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**_DEC, head_dim=32)),
        "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**_DEC, head_dim=32)),
        "olmo": lambda: tf.OlmoForCausalLM(tf.OlmoConfig(**_DEC)),
        "granite": lambda: tf.GraniteForCausalLM(tf.GraniteConfig(**_DEC)),
        "stablelm": lambda: tf.StableLmForCausalLM(tf.StableLmConfig(**_DEC)),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=H, n_layer=2, n_head=4, vocab_size=V, n_positions=256)),
        "gptj": lambda: tf.GPTJForCausalLM(tf.GPTJConfig(n_embd=H, n_layer=2, n_head=4, vocab_size=V, n_positions=256,
                                                         rotary_dim=16)),
        "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(hidden_size=H, intermediate_size=I,
                                                                   num_hidden_layers=2, num_attention_heads=4,
                                                                   vocab_size=V, max_position_embeddings=256)),
        "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(hidden_size=H, ffn_dim=I, num_hidden_layers=2,
                                                      num_attention_heads=4, vocab_size=V, max_position_embeddings=256,
                                                      word_embed_proj_dim=H, pad_token_id=1)),
        "falcon": lambda: tf.FalconForCausalLM(tf.FalconConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                                                               vocab_size=V)),
        "bloom": lambda: tf.BloomForCausalLM(tf.BloomConfig(hidden_size=H, n_layer=2, n_head=4, vocab_size=V)),
        "mixtral": lambda: tf.MixtralForCausalLM(tf.MixtralConfig(**_DEC, num_local_experts=4, num_experts_per_tok=2)),
        "qwen3_moe": lambda: tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**_DEC, head_dim=32, moe_intermediate_size=128,
                                                                      num_experts=4, num_experts_per_tok=2,
                                                                      decoder_sparse_step=1)),
        "deepseek_v3": lambda: tf.DeepseekV3ForCausalLM(tf.DeepseekV3Config(
            vocab_size=V, hidden_size=H, intermediate_size=I, moe_intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
            topk_group=1, first_k_dense_replace=1, q_lora_rank=128, kv_lora_rank=128, qk_rope_head_dim=16,
            qk_nope_head_dim=16, v_head_dim=32, max_position_embeddings=256)),
        "bert": lambda: tf.BertModel(tf.BertConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                                                   intermediate_size=I, vocab_size=V)),
        "t5": lambda: tf.T5ForConditionalGeneration(tf.T5Config(d_model=H, d_ff=I, num_layers=2, num_heads=4, d_kv=32,
                                                                vocab_size=V, decoder_start_token_id=0)),
        "mamba": lambda: tf.MambaForCausalLM(tf.MambaConfig(hidden_size=H, num_hidden_layers=2, vocab_size=V,
                                                            state_size=16, expand=2)),
    }


ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma", "gemma2", "olmo", "granite",
                 "stablelm", "gpt2", "gptj", "gpt_neox", "opt", "falcon", "bloom", "mixtral", "qwen3_moe",
                 "deepseek_v3", "bert", "t5", "mamba")
ENCODER_DECODER = ("t5",)


def build(arch: str, seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The tiny model (eval mode, float32) and one example input for it."""
    configs = _configs()
    if arch not in configs:
        raise ValueError(f"zoo: unknown architecture {arch!r}; known: {sorted(configs)}")
    torch.manual_seed(seed)
    model = configs[arch]().eval()
    ids = torch.randint(3, V, (1, 9), generator=torch.Generator().manual_seed(seed + 1))
    inputs = {"input_ids": ids}
    if arch in ENCODER_DECODER:
        inputs["decoder_input_ids"] = torch.randint(3, V, (1, 5), generator=torch.Generator().manual_seed(seed + 2))
    return model, inputs


def _output(out: Any) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    return (logits if logits is not None else out.last_hidden_state).float()


def run(arch: str, recipe: str, flow: str, calibration: Any = None) -> dict[str, Any]:
    """One cell of the zoo: ``arch`` under ``recipe`` through ``flow`` ("compile": ``torch.compile
    (backend="lowbit")``; "compress"). Returns {"sqnr_db" against eager, "exact" (``"none"``:
    bit-identical to Dynamo's own eager backend, the same traced code path, when compiled; to the
    model itself when compressed), "ratio" (whole-model
    bytes), "float_matmul": {weight: reason} for float matmul weights of >= 4096 elements,
    "error"}."""
    import copy

    from lowbit_compiler import compress
    from lowbit_compiler.backends.lowbit_backend import BackendOptions, compile_graph
    from lowbit_compiler.formats import sqnr_db

    model, inputs = build(arch)
    record: dict[str, Any] = {"arch": arch, "recipe": recipe, "flow": flow}
    summaries: list[dict[str, Any]] = []
    with torch.no_grad():
        reference = _output(model(**inputs))
        torch.compiler.reset()
        traced = _output(torch.compile(model, backend="eager")(**inputs))
        torch.compiler.reset()
        try:
            if flow == "compile":
                options = BackendOptions.from_dict({"recipe": recipe, "calibration": calibration, "progress": False})

                def backend(gm, example_inputs):
                    compiled, summary = compile_graph(gm, example_inputs, options)
                    summaries.append(summary)
                    return compiled

                out = _output(torch.compile(model, backend=backend)(**inputs))
            else:
                compressed = compress(copy.deepcopy(model), recipe, calibration=calibration, example_inputs=inputs,
                                      progress=False)
                summaries.append(compressed.lowbit_summary)
                out = _output(compressed(**inputs))
        except Exception as e:  # the table says what failed; tests assert there is nothing here
            from lowbit_compiler import _dynamo_adapter

            e = _dynamo_adapter.backend_error(e) or e
            record["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            return record
        finally:
            torch.compiler.reset()
    record["sqnr_db"] = round(sqnr_db(reference, out), 2) if not torch.equal(reference, out) else float("inf")
    # compiled: against Dynamo's own eager backend (Mamba takes another code path under Dynamo);
    # compressed: against the model itself
    record["exact"] = bool(torch.equal(out, traced if flow == "compile" else reference))
    weights: dict[str, dict[str, Any]] = {}
    for s in summaries:
        for fqn, entry in s.get("coverage", {}).get("weights", {}).items():
            if fqn not in weights or entry["status"] == "quantized":
                weights[fqn] = entry
    from lowbit_compiler.coverage import MIN_ELEMENTS, totals

    record["ratio"] = totals(weights)["ratio"] if weights else None
    record["quantized"] = sum(1 for e in weights.values() if e["status"] == "quantized")
    record["float_matmul"] = {f: e.get("reason") for f, e in weights.items()
                              if e["role"] == "matmul" and e["status"] == "float" and e["elements"] >= MIN_ELEMENTS}
    record["graphs"] = len(summaries)
    return record
