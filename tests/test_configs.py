"""Every shipped config loads into its stage's dataclass with no unknown key or bad value."""
from importlib import resources

import pytest

from dskd_pipe.pipeline.config import CacheConfig, DistillConfig, ScoreConfig, load_config

RECIPES = ("quality.toml", "real_gemma3_smollm2.toml")  # recipe files (stages/recipe.py): tests/stages/test_recipe.py
CONFIGS = sorted(p.name for p in resources.files("dskd_pipe.configs").iterdir()
                 if p.name.endswith(".toml") and p.name not in RECIPES)


def stage_of(name: str):
    if name.startswith("cache_"):
        return CacheConfig
    if name.startswith("score_"):
        return ScoreConfig
    return DistillConfig


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_config_loads(name):
    cfg = load_config(stage_of(name), name)  # by bare name: found among the package's configs
    assert cfg is not None


def test_published_setups_are_shipped():
    assert {"qwen1.5-1.8b_gpt2_dskd_cma.toml", "qwen1.5-1.8b_gpt2_cma_ga.toml",
            "mistral-7b_tinyllama_lora_cma.toml", "llama2-7b_tinyllama_lora_dskd.toml", "gpt2-1.5b_gpt2_dskd.toml",
            "distill_cpu_small.toml"} <= set(CONFIGS)
    cma_ga = load_config(DistillConfig, "qwen1.5-1.8b_gpt2_cma_ga.toml")
    assert (cma_ga.method, cma_ga.lr, cma_ga.projector_lr, cma_ga.epochs) == ("cma-ga", 5e-4, 1e-3, 20)
    assert (cma_ga.weight_decay, cma_ga.max_grad_norm, cma_ga.micro_batch_size * cma_ga.grad_accum) == (0.01, 1.0, 32)
