"""`config/` beside the networks: what a chat demo needs from the model directory besides the weights.

LLM-TPU's demos run as `python pipeline.py -m MODEL.bmodel -c config`: they read the tokenizer, the
chat template and the generation config (EOS ids, sampling defaults) from that folder with
transformers' AutoTokenizer / GenerationConfig. TPU-MLIR's llm_convert writes it by copying the
model directory without its weights and code; graphopt does the same. A model without a directory
(a registry model with random weights, a user's module) gets its config.json and a generation
config derived from it, and the result says what a demo will still miss (the tokenizer).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

FOLDER = "config"
# Weights, code and weight indexes stay out, as llm_convert leaves them out (LlmConverter.gen_config).
SKIPPED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".py", ".onnx", ".msgpack", ".h5")
SKIPPED_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model", "qwen.tiktoken")
TOKENIZER_CONFIG = "tokenizer_config.json"


@dataclass
class ConfigFolder:
    files: list[str] = field(default_factory=list)  # names written into config/, sorted
    source: str = ""  # where they came from: a directory, or "the model's config"
    missing: list[str] = field(default_factory=list)  # what a demo needs that is not there, in words

    def to_json(self) -> dict:
        return {"files": self.files, "source": self.source, "missing": self.missing}

    def report_line(self) -> str:
        line = f"  {FOLDER}/: {len(self.files)} files from {self.source}"
        return line + (f"; missing: {'; '.join(self.missing)}" if self.missing else "")


def model_directory(source) -> Path | None:
    """The checkpoint directory a model was read from, when it has one."""
    directory = getattr(source.weights, "directory", None)
    return Path(directory) if directory is not None else None


def write_config_folder(source, out_dir: Path, sampling: bool = False) -> ConfigFolder:
    """Write `out_dir/config/` for `source` (see the module's docstring). `sampling`: the networks can sample
    (--do-sample), so the demos' --do_sample reads the generation config's sampling parameters, which must
    suit sample_head; what does not is said."""
    folder = out_dir / FOLDER
    folder.mkdir()
    directory = model_directory(source)
    result = ConfigFolder()
    if directory is not None:
        for path in sorted(directory.iterdir()):
            if path.is_file() and not path.name.endswith(SKIPPED_SUFFIXES) and path.name not in SKIPPED_NAMES:
                shutil.copyfile(path, folder / path.name)
        result.source = str(directory.resolve())
    from transformers import PretrainedConfig

    if isinstance(source.config, PretrainedConfig):  # a user's own module has a config of its own making
        if not (folder / "config.json").exists():
            source.config.to_json_file(str(folder / "config.json"), use_diff=False)
        if not (folder / "generation_config.json").exists():
            _generation_config(source.config).save_pretrained(str(folder))
    else:
        result.missing.append("config.json and generation_config.json (the model has no Hugging Face config)")
    result.source = result.source or "the model's config (no model directory)"
    result.files = sorted(p.name for p in folder.iterdir())
    if not any((folder / name).exists() for name in TOKENIZER_FILES):
        result.missing.append(f"a tokenizer ({' or '.join(TOKENIZER_FILES[:2])}): copy the model's into {FOLDER}/")
    if not (folder / TOKENIZER_CONFIG).exists():
        result.missing.append(f"{TOKENIZER_CONFIG} (the chat template)")
    if sampling and (folder / "generation_config.json").exists():
        from graphopt.errors import GraphoptError
        from graphopt.runtime import Sampling

        try:
            Sampling.from_generation_config(folder / "generation_config.json")
        except GraphoptError as error:
            result.missing.append(f"sampling parameters the demos' --do_sample can use ({error})")
    return result


def _generation_config(config):
    from transformers import GenerationConfig

    return GenerationConfig.from_model_config(config)
