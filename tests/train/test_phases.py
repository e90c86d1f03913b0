import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from chatexaonepath.chat.conversation import DEFAULT_SYSTEM_PROMPT, Turn
from chatexaonepath.chat.modeling import ChatEXAONEPathForCausalLM
from chatexaonepath.chat.session import UNTRAINED_WARNING, ChatSession, load_chat_model
from chatexaonepath.errors import ChatEXAONEPathError
from chatexaonepath.train.data import file_sha256
from chatexaonepath.train.phases import prompt_builder, train_phase
from tests.train.conftest import phase_configs


class Snapshot(TrainerCallback):
    """Copies of every parameter when training starts and ends, and the optimizer's parameters."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {k: v.detach().clone() for k, v in model.named_parameters()}

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.after = {k: v.detach().clone() for k, v in model.named_parameters()}
        self.optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self.names = {k for k, p in model.named_parameters() if id(p) in self.optimized}

    def changed(self) -> set[str]:
        return {k for k in self.before if not torch.equal(self.before[k], self.after[k])}


def test_phase1_changes_only_the_tower_and_writes_a_loadable_checkpoint(dataset_dir, tiny_llm, tmp_path, caplog):
    snapshot = Snapshot()
    out = tmp_path / "p1"
    result = train_phase(*phase_configs(1, out, dataset_dir / "captions.json", dataset_dir / "features",
                                        llm=str(tiny_llm)), callbacks=[snapshot])
    changed = snapshot.changed()
    assert changed and all(k.startswith("tower.") for k in changed)
    assert {k for k in snapshot.names} == {k for k in snapshot.before if k.startswith("tower.")}
    assert result.val_records == 2 and result.train_records == 6 and len(result.eval_losses) == 1

    config = json.loads((out / "config.json").read_text())
    assert config["tower_trained"] is True and config["lora"] is None and "use_cache" not in config
    # what it was trained with: no system prompt in phase 1, and the features' provenance (write_bags: "fake")
    assert config["system_prompt"] is None and config["feature_provenance"]["encoder"] == "fake"
    info = json.loads((out / "training_args.json").read_text())
    assert info["phase"] == 1 and info["phase_config"]["learning_rate"] == 1e-3
    assert info["data"]["files_sha256"] == {str((dataset_dir / "captions.json").resolve()):
                                            file_sha256(dataset_dir / "captions.json")}
    assert info["trainer_args"]["lr_scheduler_type"] == "cosine" and info["result"]["global_step"] == result.global_step
    assert sorted(p.name for p in out.glob("checkpoint-*"))  # the Trainer's resumable checkpoints
    with caplog.at_level(logging.WARNING):
        model = load_chat_model(out)
    assert UNTRAINED_WARNING not in caplog.text
    turns = [Turn("user", "<image>\nDescribe this slide."), Turn("assistant", "Class alpha tissue.")]
    trained = prompt_builder(model).build(turns)  # the prompt training built
    chat = ChatSession(model).builder.build(turns[:1], add_generation_prompt=True)  # and the one chat builds
    assert chat.input_ids == trained.input_ids[:len(chat.input_ids)] and len(chat.input_ids) < len(trained.input_ids)
    saved = load_file(str(out / "tower.safetensors"))
    assert torch.equal(saved["feature_std"], model.tower.feature_std) and not (saved["feature_mean"] == 0).all()
    for name, value in snapshot.after.items():
        if name.startswith("tower."):
            torch.testing.assert_close(model.state_dict()[name], value)


# Phase 2 selects by exact match unless told: decoding every short validation answer (the random tiny LLM never
# stops before max_new_tokens) was most of these tests' time, and test_validation.py covers that path. The tests
# below keep validation and the checkpoint choice; they select by the loss.
FAST_SELECTION = dict(select_by="loss")


def test_phase2_changes_only_lora_and_tower_and_loads_for_chat(dataset_dir, phase1_out, tmp_path):
    snapshot = Snapshot()
    out = tmp_path / "p2"
    train_phase(*phase_configs(2, out, dataset_dir / "instruct.json", dataset_dir / "features", init=str(phase1_out),
                               learning_rate=1e-2, **FAST_SELECTION), callbacks=[snapshot])
    changed = snapshot.changed()
    assert {k for k in changed if "lora_" in k} and {k for k in changed if k.startswith("tower.")}
    assert all("lora_" in k or k.startswith("tower.") for k in changed)
    assert all("lora_" in k or k.startswith("tower.") for k in snapshot.names)
    phase1_tower = load_file(str(phase1_out / "tower.safetensors"))
    start = {k[len("tower."):]: v for k, v in snapshot.before.items() if k.startswith("tower.")}
    assert all(torch.equal(start[k], phase1_tower[k]) for k in start)  # phase 2 started from phase 1's tower

    config = json.loads((out / "config.json").read_text())
    assert config["system_prompt"] == DEFAULT_SYSTEM_PROMPT  # phase 2 trains with it in every sample
    assert config["feature_provenance"] == json.loads((phase1_out / "config.json").read_text())["feature_provenance"]
    assert config["lora"] == {"r": 4, "alpha": 8, "dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj",
                                                                                        "o_proj"]}
    assert (out / "adapter" / "adapter_config.json").is_file()
    model = ChatEXAONEPathForCausalLM.from_pretrained(out)
    assert model.config.tower_trained
    lora = {k: v for k, v in model.llm.named_parameters() if "lora_B" in k}
    assert lora and any(v.abs().sum() > 0 for v in lora.values())


class SpoilAfterFirstEpoch(TrainerCallback):
    """Wrecks the LoRA weights at the end of every epoch after the first, before they are evaluated."""

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if state.epoch > 1.5:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.normal_(0, 5.0)


def test_the_best_epoch_is_kept_not_the_last(dataset_dir, phase1_out, tmp_path):
    out = tmp_path / "p2"
    result = train_phase(*phase_configs(2, out, dataset_dir / "instruct.json", dataset_dir / "features",
                                        init=str(phase1_out), epochs=3, save_total_limit=1, **FAST_SELECTION),
                         callbacks=[SpoilAfterFirstEpoch()])
    assert len(result.eval_losses) == 3 and result.best_eval_loss == result.eval_losses[0] < min(result.eval_losses[1:])
    info = json.loads((out / "training_args.json").read_text())["result"]
    best = tmp_path / "p2" / info["best_checkpoint"].split("/")[-1]
    assert best.name == f"checkpoint-{result.global_step // 3}"
    final = trained_weights(out)
    assert all(torch.equal(trained_weights(best)[k], final[k]) for k in final)


class Interrupt(Exception):
    pass


class InterruptAfterSave(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupt  # as if the job were killed right after writing this checkpoint


class StepCounter(TrainerCallback):
    count = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.count += 1


def trained_weights(out) -> dict[str, torch.Tensor]:
    weights = dict(load_file(str(out / "tower.safetensors")))
    weights.update(load_file(str(out / "adapter" / "adapter_model.safetensors")))
    return weights


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(dataset_dir, phase1_out, tmp_path):
    def configs(out):
        return phase_configs(2, out, dataset_dir / "instruct.json", dataset_dir / "features", init=str(phase1_out),
                             epochs=2, save_steps=4, max_patches=5, learning_rate=1e-2, **FAST_SELECTION)

    train_phase(*configs(tmp_path / "straight"))
    with pytest.raises(Interrupt):
        train_phase(*configs(tmp_path / "resumed"), callbacks=[InterruptAfterSave(4)])
    assert not (tmp_path / "resumed" / "config.json").exists()  # no final model from the killed run
    with pytest.raises(ChatEXAONEPathError, match="already holds checkpoints.*--resume"):
        train_phase(*configs(tmp_path / "resumed"))
    steps = StepCounter()
    result = train_phase(*configs(tmp_path / "resumed"), resume=True, callbacks=[steps])
    assert steps.count == result.global_step - 4  # it continued from checkpoint-4, not from the start
    straight, resumed = trained_weights(tmp_path / "straight"), trained_weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)
    last = sorted((tmp_path / "straight").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    torch.testing.assert_close(trained_weights(tmp_path / "resumed" / last.name), trained_weights(last))


def test_resume_refuses_changed_data(dataset_dir, phase1_out, tmp_path):
    out = tmp_path / "p2"
    data = tmp_path / "instruct.json"
    data.write_text((dataset_dir / "instruct.json").read_text())
    config, data_config = phase_configs(2, out, data, dataset_dir / "features", init=str(phase1_out), max_steps=2,
                                        save_steps=1, **FAST_SELECTION)
    with pytest.raises(Interrupt):
        train_phase(config, data_config, callbacks=[InterruptAfterSave(1)])
    records = json.loads(data.read_text())
    data.write_text(json.dumps(records[:-2]))
    with pytest.raises(ChatEXAONEPathError, match="data files changed"):
        train_phase(config, data_config, resume=True)


def test_phase2_needs_a_phase1_checkpoint(dataset_dir, tmp_path):
    config, data = phase_configs(2, tmp_path / "p2", dataset_dir / "instruct.json", dataset_dir / "features",
                                 init=str(tmp_path))
    with pytest.raises(ChatEXAONEPathError, match="not a ChatEXAONEPath checkpoint"):
        train_phase(config, data)
