"""Broken run configs and command options, run through ``chiasm train`` and ``chiasm eval``."""

from __future__ import annotations

from pathlib import Path

from .env import Env, Expect, good_records
from .registry import case


def _config_err(env: Env, *named: str, stage: str = "", model: str = "", top: str = "", lm: str | None = None,
                text: str | None = None, data: Path | None = None, name_config: bool = True,
                no_eval: bool = True, before_model: bool = True) -> Expect:
    data = data if data is not None else env.write_json(good_records())
    argv = env.train(data, stage=stage, model=model, top=top, lm=lm, no_eval=no_eval)
    path = Path(argv[2])
    if text is not None:
        path.write_text(text)
    return Expect(argv, named=(str(path), *named) if name_config else named,
                  absent=(*env.train_leftovers(), env.run_dir / "config.json"), before_model=before_model)


@case("config", "train")
def config_lr_zero(env: Env) -> Expect:
    return _config_err(env, "stages[0].lr", stage="lr = 0.0\n")


@case("config", "train")
def config_lr_nan(env: Env) -> Expect:
    return _config_err(env, "stages[0].lr", "finite", stage="lr = nan\n")


@case("config", "train")
def config_grad_accum_zero(env: Env) -> Expect:
    return _config_err(env, "stages[0].grad_accum", stage="grad_accum = 0\n")


@case("config", "train")
def config_warmup_ratio_above_one(env: Env) -> Expect:
    return _config_err(env, "stages[0].warmup_ratio", stage="warmup_ratio = 1.5\n")


@case("config", "train")
def config_lora_dropout_one(env: Env) -> Expect:
    return _config_err(env, "lora_dropout", stage='[stages.lm]\nmode = "lora"\nlora_dropout = 1.0\n')


@case("config", "train")
def config_negative_seed(env: Env) -> Expect:
    return _config_err(env, "seed", top="seed = -1\n")


@case("config", "train")
def config_max_length_zero(env: Env) -> Expect:
    return _config_err(env, "max_length", model="max_length = 0\n")


@case("config", "train")
def config_unknown_top_key(env: Env) -> Expect:
    return _config_err(env, "learning_rate", top="learning_rate = 0.1\n")


@case("config", "train")
def config_unknown_stage_key(env: Env) -> Expect:
    return _config_err(env, "epoch", stage="epoch = 2\n")


@case("config", "train")
def config_unknown_encoder_key(env: Env) -> Expect:
    return _config_err(env, "size", model='[model.bridge]\nname = "mlp"\nsize = 3\n')


@case("config", "train")
def config_wrong_type_string_for_int(env: Env) -> Expect:
    return _config_err(env, "grad_accum", stage='grad_accum = "2"\n')


@case("config", "train")
def config_wrong_type_string_for_float(env: Env) -> Expect:
    return _config_err(env, "lr", stage='lr = "fast"\n')


@case("config", "train")
def config_wrong_type_bool_for_int(env: Env) -> Expect:
    return _config_err(env, "grad_accum", stage="grad_accum = true\n")


@case("config", "train")
def config_on_error_unknown(env: Env) -> Expect:
    return _config_err(env, "on_error", stage='on_error = "ignore"\n')


@case("config", "train")
def config_missing_stages(env: Env) -> Expect:
    text = f'output_dir = "{env.run_dir}"\n[model.lm]\nsource = "{env.lm_dir}"\n'
    return _config_err(env, "stages", text=text)


@case("config", "train")
def config_stage_without_data(env: Env) -> Expect:
    text = f'output_dir = "{env.run_dir}"\n[model.lm]\nsource = "{env.lm_dir}"\n[[stages]]\nname = "a"\n'
    return _config_err(env, "data", text=text)


@case("config", "train")
def config_stages_not_a_list(env: Env) -> Expect:
    text = f'output_dir = "{env.run_dir}"\n[stages]\nname = "a"\ndata = "x.json"\n'
    return _config_err(env, "stages", text=text)


@case("config", "train")
def config_empty_file(env: Env) -> Expect:
    return _config_err(env, "empty", text="")


@case("config", "train")
def config_bad_toml(env: Env) -> Expect:
    return _config_err(env, "not valid TOML", text="[[stages]\nname = 'a'\n")


@case("config", "train")
def config_duplicate_key_toml(env: Env) -> Expect:
    return _config_err(env, "not valid TOML", text="seed = 1\nseed = 2\n")


@case("config", "train")
def config_bad_json(env: Env) -> Expect:
    path = env.root / "run.json"
    path.write_text("{")
    return Expect(["train", "--config", str(path)], named=(str(path), "not valid JSON"),
                  absent=env.train_leftovers(), before_model=True)


@case("config", "train")
def config_unknown_encoder(env: Env) -> Expect:
    text = env.train_config(env.write_json(good_records())).read_text().replace('"tiny-vit"', '"tiny-vitt"')
    return _config_err(env, "tiny-vitt", text=text)


@case("config", "train")
def config_unknown_bridge(env: Env) -> Expect:
    return _config_err(env, "mlpp", model='[model.bridge]\nname = "mlpp"\n')


@case("config", "train")
def config_unknown_bridge_option(env: Env) -> Expect:
    return _config_err(env, "depthh", model='[model.bridge]\nname = "mlp"\noptions = { depthh = 2 }\n')


@case("config", "train")
def config_unknown_layout(env: Env) -> Expect:
    return _config_err(env, "spiral", model='image_layout = "spiral"\n')


@case("config", "train")
def config_unknown_objective(env: Env) -> Expect:
    return _config_err(env, "lmm", stage='objective = "lmm"\n')


@case("config", "train")
def config_unknown_scorer(env: Env) -> Expect:
    return _config_err(env, "exactt", top='[eval]\nscorer = "exactt"\n')


@case("config", "train")
def config_unknown_policy_mode(env: Env) -> Expect:
    return _config_err(env, "loraa", stage='[stages.lm]\nmode = "loraa"\n')


@case("config", "train")
def config_missing_lm_folder(env: Env) -> Expect:
    missing = env.root / "no-such-lm"
    return _config_err(env, str(missing), "folder not found", lm=str(missing), name_config=False,
                       before_model=False)  # found by the LM loader


@case("config", "train")
def config_missing_data_file(env: Env) -> Expect:
    """A data file that is not there is found before any model is built."""
    return _config_err(env, str(env.root / "nope.json"), data=env.root / "nope.json")


@case("config", "train")
def config_data_is_folder(env: Env) -> Expect:
    return _config_err(env, str(env.root), data=env.root)


@case("config", "train")
def config_eval_data_missing(env: Env) -> Expect:
    """The eval set named by a run is checked before training, not after an hour of it."""
    missing = env.root / "eval-nope.json"
    return _config_err(env, str(missing), "eval.data", top=f'[eval]\ndata = "{missing}"\n', no_eval=False)


@case("config", "train")
def config_image_root_missing(env: Env) -> Expect:
    missing = env.root / "no-images"
    return _config_err(env, str(missing), stage=f'image_root = "{missing}"\n')


@case("config", "train")
def config_unsafe_stage_name(env: Env) -> Expect:
    text = env.train_config(env.write_json(good_records())).read_text().replace('name = "align"', 'name = "../x"')
    return _config_err(env, "not a safe folder name", text=text)


@case("config", "train")
def config_duplicate_stage_names(env: Env) -> Expect:
    data = env.write_json(good_records())
    text = env.train_config(data).read_text() + f'[[stages]]\nname = "align"\ndata = "{data}"\nmax_steps = 1\n'
    return _config_err(env, "already the name", text=text)


@case("config", "train")
def config_missing_file(env: Env) -> Expect:
    path = env.root / "nope.toml"
    return Expect(["train", "--config", str(path)], named=(str(path), "not found"), absent=env.train_leftovers(),
                  before_model=True)


@case("config", "eval")
def eval_unknown_scorer_option(env: Env) -> Expect:
    return Expect(env.eval(env.write_json(good_records()), extra=("--scorer", "exactt")), named=("exactt",),
                  absent=env.eval_leftovers(), before_model=True)


@case("config", "eval")
def eval_max_samples_negative(env: Env) -> Expect:
    return Expect(env.eval(env.write_json(good_records()), extra=("--max-samples", "-3")), named=("max_samples",),
                  absent=env.eval_leftovers(), before_model=True)


@case("config", "train")
def config_unknown_precision(env: Env) -> Expect:
    return _config_err(env, "precision", "fp8", top='precision = "fp8"\n')


@case("config", "train")
def config_unknown_model_dtype(env: Env) -> Expect:
    return _config_err(env, "dtype", "fp64", model='dtype = "fp64"\n')


@case("config", "train")
def config_empty_lm_source(env: Env) -> Expect:
    return _config_err(env, "source", lm="")


@case("config", "train")
def config_json_list(env: Env) -> Expect:
    path = env.root / "run.json"
    path.write_text("[1, 2]")
    return Expect(["train", "--config", str(path)], named=(str(path),), absent=env.train_leftovers(),
                  before_model=True)


@case("config", "train")
def config_table_given_a_number(env: Env) -> Expect:
    text = env.train_config(env.write_json(good_records())).read_text().replace(
        '[model]\n', '[model]\nbridge = 5\n').replace('[model.bridge]\nname = "mlp"\n', '')
    return _config_err(env, "bridge", text=text)


@case("config", "train")
def config_stage_entry_not_a_table(env: Env) -> Expect:
    return _config_err(env, "stages", text=f'output_dir = "{env.run_dir}"\nstages = [1, 2]\n')
