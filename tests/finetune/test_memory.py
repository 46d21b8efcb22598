"""The fine-tuning column of the requirements table: the estimate, `estimate --finetune`, and what doctor says."""
from __future__ import annotations

import pytest

from glmsetup import profiles, requirements as req


@pytest.mark.parametrize("profile", ["cuda-fp16", "cuda-int8", "cuda-int4"])
def test_within_ten_percent_of_the_table_at_train_sh_settings(profile):
    prof = profiles.load(profile)
    table = next(r.finetune_gb for r in req.REQUIREMENTS if r.precision == prof.precision)
    est = req.finetune_estimate(prof, req.FinetuneSettings())  # train.sh: 128, 64 + 128 tokens, batch 1
    assert abs(est.total / 1e9 - table) / table <= 0.10, (profile, est.total / 1e9, table)


def test_parts_follow_the_arithmetic():
    s = req.FinetuneSettings()
    assert req.finetune_trainable(s) == 128 * 28 * 2 * 2 * 128 == 1_835_008  # the official PrefixEncoder
    lora = req.FinetuneSettings(method="lora")
    assert req.finetune_trainable(lora) == 28 * 8 * ((4096 + 4096) + 2 * (4096 + 256))
    est = req.finetune_estimate(profiles.load("cuda-int4"), s)
    assert est.trainable == est.gradients == 4 * 1_835_008 and est.optimizer == 8 * 1_835_008  # fp32, AdamW m and v
    assert est.weights == req.weight_bytes("float16", 4) and est.workspace > 0
    longer = req.finetune_estimate(profiles.load("cuda-int4"), req.FinetuneSettings(max_target_length=1024))
    bigger = req.finetune_estimate(profiles.load("cuda-int4"), req.FinetuneSettings(batch_size=4))
    assert longer.activations > est.activations and bigger.activations > 3 * est.activations
    unchecked = req.finetune_estimate(profiles.load("cuda-int4"), req.FinetuneSettings(gradient_checkpointing=False))
    assert unchecked.activations > 5 * est.activations


def test_estimate_cli(cli):
    data = cli.json("estimate", "--profile", "cuda-int4", "--finetune", "ptuning")["data"]
    b = data["bytes"]
    assert b["total"] == sum(v for k, v in b.items() if k != "total")
    assert data["official"]["min_finetune_gb"] == 7 and data["trainable_parameters"] == 1_835_008
    assert all(type(v) is int for v in b.values())
    data = cli.json("estimate", "--profile", "cpu-int8", "--finetune", "lora", "--lora-rank", "16")["data"]
    assert data["settings"]["lora_rank"] == 16 and "refuses" in data["note"]
    out = cli("estimate", "--profile", "cuda-fp16", "--finetune", "ptuning", "--max-target-length", "256")
    assert out.exit_code == 0 and "prefix encoder" in out.stdout and "optimizer state" in out.stdout


def test_doctor_says_which_method_fits():
    from glmsetup.doctor.verdict import finetune_verdict
    from tests.doctor import machines

    def best(facts):
        v = finetune_verdict(facts, profiles.load_all())
        return {m["method"]: m["best"] for m in v["methods"]}, {m["method"]: m for m in v["methods"]}

    got, by = best(machines.rtx4090())  # 24 GB card, no peft installed
    assert got == {"ptuning": "cuda-fp16", "lora": None}
    fp16 = next(p for p in by["lora"]["profiles"] if p["name"] == "cuda-fp16")
    assert fp16["blockers"] == ["LoRA needs peft"] and fp16["fixes"] == ['pip install "glmsetup[finetune]"']
    assert by["ptuning"]["estimate"]["profile"] == "cuda-fp16"
    with_peft = machines.rtx4090()
    with_peft.packages["peft"] = "0.13.2"
    assert best(with_peft)[0] == {"ptuning": "cuda-fp16", "lora": "cuda-fp16"}
    assert best(machines.rtx3070())[0]["ptuning"] == "cuda-int4"  # 8 GB: the table's INT4 7 GB
    assert best(machines.two_12gb_cards())[0]["ptuning"] == "cuda-int8"  # one card per run: 12 GB holds INT8 9 GB
    got, by = best(machines.rtx2060_laptop())  # 6 GB: not even INT4 on the card; int8 in RAM
    assert got["ptuning"] == "cpu-int8"
    assert all(p["fit"] == "no" for p in by["ptuning"]["profiles"] if p["name"].startswith("cuda"))
    assert {p["name"] for p in by["lora"]["profiles"] if "LoRA trains float weights (use ptuning over int8/int4)"
            in p["blockers"]} == {"cuda-int8", "cuda-int4", "cpu-int8", "cpu-int4"}


def test_doctor_text_says_what_is_missing_when_memory_fits():
    """A 24 GB card without peft: LoRA fits in memory, so the line says it does not run yet, why, and the fix."""
    import io

    from rich.console import Console

    from glmsetup.doctor.render import render_finetune
    from glmsetup.doctor.verdict import finetune_verdict
    from tests.doctor import machines

    out = io.StringIO()
    render_finetune(Console(file=out, width=400, color_system=None),
                    {"finetune": finetune_verdict(machines.rtx4090(), profiles.load_all())})
    [lora] = [line for line in out.getvalue().splitlines() if " lora " in line]
    assert "nothing runs yet (cuda-fp16: " in lora and "nothing fits" not in lora and "needs LoRA" not in lora
    assert lora.endswith('; LoRA needs peft; fix: pip install "glmsetup[finetune]")')


def test_doctor_json_and_text_carry_the_fine_tuning_verdict(cli):
    import json

    result = cli("doctor", "--json")  # its exit code depends on this machine
    data = json.loads(result.stdout)["data"]
    assert [m["method"] for m in data["finetune"]["methods"]] == ["ptuning", "lora"]
    assert data["finetune"]["settings"]["pre_seq_len"] == 128
    text = cli("doctor").stdout
    assert "fine-tuning (pre_seq_len 128, 64 + 128 tokens, batch 1" in text and " ptuning " in text and " lora " in text


@pytest.mark.parametrize("method", ["ptuning", "lora"])
def test_estimate_finetune_with_the_default_profile(cli, method):
    """`estimate --finetune METHOD` without --profile shows a profile, not "unknown profile 'auto'"."""
    data = cli.json("estimate", "--finetune", method)["data"]
    assert data["method"] == method and data["profile"] in {p.name for p in profiles.load_all()}
    if method == "lora":  # LoRA trains float weights: never an int8/int4 profile
        assert not profiles.load(data["profile"]).quantization_bits
    out = cli("estimate", "--finetune", method)
    assert out.exit_code == 0 and "unknown profile" not in out.stderr and data["profile"] in out.stdout


def test_default_finetune_estimate_profile_follows_doctor():
    from glmsetup.doctor import finetune_profile
    from tests.doctor import machines

    def finetune_estimate_profile(method, facts):
        return finetune_profile(method, facts=facts, must_run=False)

    # a 24 GB card without peft: LoRA cannot run yet, but its estimate is for the float profile that fits
    assert finetune_estimate_profile("ptuning", facts=machines.rtx4090()).name == "cuda-fp16"
    assert finetune_estimate_profile("lora", facts=machines.rtx4090()).name == "cuda-fp16"
    assert finetune_estimate_profile("ptuning", facts=machines.rtx3070()).name == "cuda-int4"
    lora = finetune_estimate_profile("lora", facts=machines.rtx3070())  # 8 GB: no float profile on the card
    assert not lora.quantization_bits and lora.device == "cpu"


def test_finetune_and_estimate_pick_through_one_function():
    """`finetune` (its Settings object) and `estimate --finetune` (a FinetuneSettings) pick with the same
    settings; finetune needs a profile that runs here, estimate falls back to the nearest usable one."""
    import pytest

    from glmsetup import requirements
    from glmsetup.doctor import finetune_profile
    from glmsetup.errors import ResourceError
    from glmsetup.finetune.train import Settings
    from tests.doctor import machines

    card = machines.rtx3070()  # 8 GB
    assert finetune_profile("ptuning", facts=card).name == "cuda-int4"
    longer = {"batch_size": 4, "max_source_length": 256, "max_target_length": 256}  # too much for the card
    run = Settings(method="ptuning", data="d.json", model="m", output="o", **longer)
    estimate = requirements.FinetuneSettings(method="ptuning", **longer)
    assert finetune_profile("ptuning", run, facts=card).name == "cpu-int8"
    assert finetune_profile("ptuning", estimate, facts=card).name == "cpu-int8"
    assert finetune_profile("ptuning", longer, facts=card).name == "cpu-int8"
    with pytest.raises(ResourceError, match="no profile fits fine-tuning with lora"):
        finetune_profile("lora", facts=card)  # no peft, no float profile on the card
    assert finetune_profile("lora", facts=card, must_run=False).name == "cpu-bf16"
