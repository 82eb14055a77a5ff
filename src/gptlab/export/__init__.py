"""Hugging Face interoperability: export a run, import a model, push to the Hub, write GGUF.

    export_hf(run, out_dir, which="best", dtype="float32", force=False) -> dict
        a folder transformers' AutoModelForCausalLM / AutoTokenizer load with no custom code
        (LlamaForCausalLM, ArceeForCausalLM or GPT2LMHeadModel, whichever expresses the run's [model])
    import_hf(hf_dir, run_dir, context_length=None, force=False) -> dict
        a local GPT-2 / Llama / Arcee folder -> a gptlab run (sample, eval, train.init_from)
    push_to_hub(folder, repo_id, private=False) -> url
    export_gguf(run, path, which="best", force=False) -> dict     llama.cpp / Ollama (Llama-shaped runs)
    family_for(model_cfg) -> Family                                which architecture, or why none

A chat run (its tokenizer holds the chat tokens) exports with its chat template: tokenizer_config.json's
chat_template (apply_chat_template gives gptlab's prompt ids) and GGUF's tokenizer.chat_template, and
<|end|> among the ids generation stops at.
"""

from gptlab.export.families import FAMILIES, GPT2, Arcee, Family, Llama, family_for
from gptlab.export.hf import export_hf, import_hf
from gptlab.export.hub import push_to_hub
from gptlab.export.llamacpp import export_gguf

__all__ = ["FAMILIES", "GPT2", "Arcee", "Family", "Llama", "export_gguf", "export_hf", "family_for", "import_hf", "push_to_hub"]
