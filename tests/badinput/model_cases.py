"""Broken model folders and chat questions, run through ``chiasm chat`` and ``chiasm eval``."""

from __future__ import annotations

import json

from .env import Env, Expect, good_records
from .registry import case


@case("model", "chat")
def model_folder_missing(env: Env) -> Expect:
    missing = env.root / "no-model"
    return Expect(env.chat(model=missing), named=(str(missing),))


@case("model", "chat")
def model_folder_is_file(env: Env) -> Expect:
    path = env.root / "model.txt"
    path.write_text("x")
    return Expect(env.chat(model=path), named=(str(path),))


@case("model", "chat")
def model_config_missing(env: Env) -> Expect:
    folder = env.model_copy()
    (folder / "chiasm_config.json").unlink()
    return Expect(env.chat(model=folder), named=(str(folder), "chiasm_config.json"))


@case("model", "chat")
def model_config_corrupt(env: Env) -> Expect:
    folder = env.model_copy()
    (folder / "chiasm_config.json").write_text("{ not json")
    return Expect(env.chat(model=folder), named=(str(folder / "chiasm_config.json"),))


@case("model", "chat")
def model_config_wrong_shape(env: Env) -> Expect:
    folder = env.model_copy()
    (folder / "chiasm_config.json").write_text("[1, 2]")
    return Expect(env.chat(model=folder), named=(str(folder / "chiasm_config.json"),))


@case("model", "chat")
def model_config_empty(env: Env) -> Expect:
    folder = env.model_copy()
    (folder / "chiasm_config.json").write_text("")
    return Expect(env.chat(model=folder), named=(str(folder / "chiasm_config.json"),))


@case("model", "chat")
def model_config_bad_value(env: Env) -> Expect:
    folder = env.model_copy()
    path = folder / "chiasm_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "max_length": -5}))
    return Expect(env.chat(model=folder), named=(str(path), "max_length"))


@case("model", "chat")
def model_config_unknown_bridge(env: Env) -> Expect:
    folder = env.model_copy()
    path = folder / "chiasm_config.json"
    cfg = json.loads(path.read_text())
    cfg["bridge"]["name"] = "mlpp"
    path.write_text(json.dumps(cfg))
    return Expect(env.chat(model=folder), named=(str(path), "mlpp"))


@case("model", "chat")
def model_truncated_bridge(env: Env) -> Expect:
    folder = env.model_copy()
    path = folder / "bridge.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    return Expect(env.chat(model=folder), named=(str(path),))


@case("model", "chat")
def model_zero_byte_encoder(env: Env) -> Expect:
    folder = env.model_copy()
    path = folder / "encoder.safetensors"
    path.write_bytes(b"")
    return Expect(env.chat(model=folder), named=(str(path),))


@case("model", "eval")
def model_truncated_lm_weights(env: Env) -> Expect:
    folder = env.model_copy()
    path = folder / "lm" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    return Expect(env.eval(env.write_json(good_records()), model=folder), named=(str(folder / "lm"),),
                  absent=env.eval_leftovers())


@case("model", "chat")
def model_lm_missing(env: Env) -> Expect:
    folder = env.model_copy()
    import shutil

    shutil.rmtree(folder / "lm")
    return Expect(env.chat(model=folder), named=(str(folder / "lm"),))


@case("model", "chat")
def model_lm_tokenizer_missing(env: Env) -> Expect:
    folder = env.model_copy()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (folder / "lm" / name).exists():
            (folder / "lm" / name).unlink()
    return Expect(env.chat(model=folder), named=(str(folder / "lm"),))


@case("model", "chat")
def chat_empty_question(env: Env) -> Expect:
    return Expect(env.chat(question=""), named=("the question is empty",), before_model=True)


@case("model", "chat")
def chat_blank_question(env: Env) -> Expect:
    return Expect(env.chat(question=" \n\t"), named=("the question is empty",), before_model=True)


@case("model", "chat")
def chat_placeholder_without_image(env: Env) -> Expect:
    return Expect(env.chat(question="<image> What is this?", images=()), named=("1 <image> placeholder(s)",
                                                                                  "0 image(s)"), before_model=True)


@case("model", "chat")
def chat_two_placeholders_one_image(env: Env) -> Expect:
    return Expect(env.chat(question="<image><image> Which?"), named=("2 <image> placeholder(s)",), before_model=True)


@case("model", "chat")
def chat_question_too_long(env: Env) -> Expect:
    """A question longer than the LM's context is refused, never cut (its image tokens would go first)."""
    return Expect(env.chat(question="why " * 3000), named=("exceeds",))


@case("model", "chat")
def chat_max_new_tokens_zero(env: Env) -> Expect:
    argv = env.chat()
    argv[argv.index("--max-new-tokens") + 1] = "0"
    return Expect(argv, named=("--max-new-tokens",), before_model=True)


@case("model", "chat")
def chat_max_new_tokens_negative(env: Env) -> Expect:
    argv = env.chat()
    argv[argv.index("--max-new-tokens") + 1] = "-4"
    return Expect(argv, named=("--max-new-tokens",), before_model=True)


@case("config", "train")
def train_out_is_a_file(env: Env) -> Expect:
    blocker = env.root / "a-file"
    blocker.write_text("")
    argv = [*env.train(env.write_json(good_records())), "--out", str(blocker)]
    return Expect(argv, named=(str(blocker),), before_model=True)


@case("config", "train")
def train_out_under_a_file(env: Env) -> Expect:
    blocker = env.root / "a-file"
    blocker.write_text("")
    argv = [*env.train(env.write_json(good_records())), "--out", str(blocker / "run")]
    return Expect(argv, named=(str(blocker / "run"),), before_model=True)


@case("model", "eval")
def eval_model_missing(env: Env) -> Expect:
    missing = env.root / "no-model"
    return Expect(env.eval(env.write_json(good_records()), model=missing), named=(str(missing),),
                  absent=env.eval_leftovers())


@case("model", "eval")
def eval_model_config_corrupt(env: Env) -> Expect:
    folder = env.model_copy()
    (folder / "chiasm_config.json").write_text("{")
    return Expect(env.eval(env.write_json(good_records()), model=folder),
                  named=(str(folder / "chiasm_config.json"),), absent=env.eval_leftovers())


@case("model", "eval")
def eval_model_empty_folder(env: Env) -> Expect:
    folder = env.root / "empty-model"
    folder.mkdir()
    return Expect(env.eval(env.write_json(good_records()), model=folder), named=(str(folder),),
                  absent=env.eval_leftovers())


@case("model", "chat")
def model_given_as_the_run_folder(env: Env) -> Expect:
    """``--model RUN`` instead of ``RUN/model``: the message points at the model folder inside."""
    run = env.root / "run"
    run.mkdir()
    import shutil

    shutil.copytree(env.saved_model, run / "model")
    return Expect(env.chat(model=run), named=(str(run), str(run / "model")))


@case("model", "eval")
def eval_soft_scorer_without_answers(env: Env) -> Expect:
    data = env.write_json(good_records(2))
    return Expect(env.eval(data, extra=("--scorer", "vqa_soft")), named=(str(data), "answers"), sample="ok-0",
                  absent=env.eval_leftovers(), before_model=True)
