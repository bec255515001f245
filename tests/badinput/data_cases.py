"""Broken data files and records, run through ``chiasm train`` and ``chiasm eval``."""

from __future__ import annotations

import json

from .env import Env, Expect, good_records, record
from .registry import BAD, _eval_err, _train_err, _with_bad, case


@case("data", "train")
def data_not_json(env: Env) -> Expect:
    path = env.data_dir() / "data.json"
    path.write_text("[this is not json")
    return _train_err(env, path, "malformed JSON", sample=None)


@case("data", "eval")
def eval_data_not_json(env: Env) -> Expect:
    path = env.data_dir() / "data.json"
    path.write_text("[{\"id\": 1,")
    return _eval_err(env, path, "malformed JSON", sample=None)


@case("data", "train")
def data_object_not_list(env: Env) -> Expect:
    return _train_err(env, env.write_json({"data": good_records()}), sample=None)


@case("data", "train")
def data_list_of_strings(env: Env) -> Expect:
    return _train_err(env, env.write_json(["a", "b"]), "JSON object", sample=None)


@case("data", "train")
def data_json_number(env: Env) -> Expect:
    return _train_err(env, env.write_json(42), sample=None)


@case("data", "train")
def data_empty_file(env: Env) -> Expect:
    path = env.data_dir() / "data.json"
    path.write_text("")
    return _train_err(env, path, "empty", sample=None)


@case("data", "train")
def data_whitespace_only(env: Env) -> Expect:
    path = env.data_dir() / "data.json"
    path.write_text("\n  \n")
    return _train_err(env, path, "empty", sample=None)


@case("data", "train")
def data_empty_list(env: Env) -> Expect:
    return _train_err(env, env.write_json([]), "no records", sample=None)


@case("data", "train")
def data_utf8_bom(env: Env) -> Expect:
    """A BOM is how some editors mark UTF-8: read it (exit 0) or refuse by name, never a traceback."""
    path = env.data_dir() / "data.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(good_records()).encode())
    return Expect(env.train(path), ok=True)


@case("data", "train")
def data_utf16(env: Env) -> Expect:
    path = env.data_dir() / "data.json"
    path.write_bytes(json.dumps(good_records()).encode("utf-16"))
    return _train_err(env, path, "UTF-8", sample=None)


@case("data", "train")
def data_latin1(env: Env) -> Expect:
    path = env.data_dir() / "data.json"
    path.write_bytes(json.dumps([record("caf\u00e9", answer="caf\u00e9")], ensure_ascii=False).encode("latin-1"))
    return _train_err(env, path, "UTF-8", sample=None)


@case("data", "train")
def data_jsonl_broken_line(env: Env) -> Expect:
    lines = [json.dumps(r) for r in good_records()]
    path = env.write_jsonl([lines[0], '{"id": "x", "conversations": [', *lines[1:]])
    return _train_err(env, path, "line 2", "malformed JSON", sample=None)


@case("data", "train")
def data_jsonl_broken_line_skipped(env: Env) -> Expect:
    lines = [json.dumps(r) for r in good_records()]
    path = env.write_jsonl([lines[0], "not json at all", *lines[1:]])
    return Expect(env.train(path, skip=True), skipped=True, sample="line 2")


@case("data", "train")
def data_jsonl_line_is_list(env: Env) -> Expect:
    lines = [json.dumps(r) for r in good_records()]
    path = env.write_jsonl([lines[0], "[1, 2]", *lines[1:]])
    return _train_err(env, path, "line 2", "JSON object", sample=None)


@case("data", "train")
def data_missing_id(env: Env) -> Expect:
    bad = record(BAD)
    del bad["id"]
    return _train_err(env, _with_bad(env, bad), "record [1]", "no 'id'", sample=None)


@case("data", "train")
def data_missing_conversations(env: Env) -> Expect:
    bad = record(BAD)
    del bad["conversations"]
    return _train_err(env, _with_bad(env, bad), "'conversations'")


@case("data", "train")
def data_conversations_not_list(env: Env) -> Expect:
    return _train_err(env, _with_bad(env, {**record(BAD), "conversations": "hello"}), "'conversations'")


@case("data", "train")
def data_conversations_empty(env: Env) -> Expect:
    return _train_err(env, _with_bad(env, {**record(BAD), "conversations": []}), "empty")


@case("data", "train")
def data_turn_not_object(env: Env) -> Expect:
    return _train_err(env, _with_bad(env, {**record(BAD), "conversations": ["<image> hi", "red"]}), "turn 0")


@case("data", "train")
def data_unknown_role(env: Env) -> Expect:
    bad = record(BAD)
    bad["conversations"][1]["from"] = "robot"
    return _train_err(env, _with_bad(env, bad), "'robot'")


@case("data", "train")
def data_role_missing(env: Env) -> Expect:
    bad = record(BAD)
    del bad["conversations"][0]["from"]
    return _train_err(env, _with_bad(env, bad), "turn 0", "role")


@case("data", "train")
def data_value_not_string(env: Env) -> Expect:
    bad = record(BAD)
    bad["conversations"][1]["value"] = 5
    return _train_err(env, _with_bad(env, bad), "turn 1", "string")


@case("data", "train")
def data_empty_answer(env: Env) -> Expect:
    """An empty answer teaches the model to stop at once: refuse it by name."""
    return _train_err(env, _with_bad(env, record(BAD, answer="")), "empty")


@case("data", "train")
def data_empty_question(env: Env) -> Expect:
    return _train_err(env, _with_bad(env, record(BAD, image=None, question="  ")), "empty")


@case("data", "train")
def data_ends_on_human_turn(env: Env) -> Expect:
    bad = record(BAD)
    bad["conversations"].append({"from": "human", "value": "And the circle?"})
    return _train_err(env, _with_bad(env, bad), "end with a gpt turn")


@case("data", "train")
def data_no_assistant_turn(env: Env) -> Expect:
    bad = record(BAD)
    bad["conversations"] = bad["conversations"][:1]
    return _train_err(env, _with_bad(env, bad), "gpt")


@case("data", "train")
def data_two_human_turns(env: Env) -> Expect:
    bad = record(BAD)
    bad["conversations"].insert(1, {"from": "human", "value": "Please?"})
    return _train_err(env, _with_bad(env, bad), "alternate")


@case("data", "train")
def data_only_system_turn(env: Env) -> Expect:
    bad = {**record(BAD, image=None), "conversations": [{"from": "system", "value": "Be brief."}]}
    return _train_err(env, _with_bad(env, bad), "only a system turn")


@case("data", "train")
def data_system_turn_in_the_middle(env: Env) -> Expect:
    bad = record(BAD)
    bad["conversations"].insert(1, {"from": "system", "value": "Be brief."})
    return _train_err(env, _with_bad(env, bad), "turn 1 is system")


@case("data", "train")
def data_role_capitalised(env: Env) -> Expect:
    bad = record(BAD)
    bad["conversations"][0]["from"] = "Human"
    return _train_err(env, _with_bad(env, bad), "'Human'")


@case("data", "train")
def data_jsonl_null_line(env: Env) -> Expect:
    lines = [json.dumps(r) for r in good_records()]
    path = env.write_jsonl([*lines, "null"])
    return _train_err(env, path, "line 4", "JSON object", sample=None)


@case("data", "train")
def data_placeholder_in_answer(env: Env) -> Expect:
    bad = record(BAD, question="What is it?", answer="<image>")
    return _train_err(env, _with_bad(env, bad), "only human turns")


@case("data", "train")
def data_duplicate_ids(env: Env) -> Expect:
    return _train_err(env, env.write_json([*good_records(), record("ok-1")]), "duplicate id", sample="ok-1")


@case("data", "train")
def data_duplicate_int_and_str_id(env: Env) -> Expect:
    """7 and "7" are one id once read (ids are strings): a second record under it is a duplicate."""
    return _train_err(env, env.write_json([record(7), record("7")]), "duplicate id", sample="7")


@case("data", "train")
def data_image_is_number(env: Env) -> Expect:
    return _train_err(env, _with_bad(env, record(BAD, image=3)), "'image'")


@case("data", "train")
def data_image_is_dict(env: Env) -> Expect:
    return _train_err(env, _with_bad(env, record(BAD, image={"path": "img.png"})), "'image'")


@case("data", "train")
def data_image_empty_string(env: Env) -> Expect:
    return _train_err(env, _with_bad(env, record(BAD, image="")), "'image'")


@case("data", "train")
def data_image_list_with_null(env: Env) -> Expect:
    return _train_err(env, _with_bad(env, record(BAD, image=["img.png", None])), "'image'")


@case("data", "train")
def data_more_placeholders_than_images(env: Env) -> Expect:
    bad = record(BAD, question="<image>\n<image>\nWhich is larger?")
    return _train_err(env, _with_bad(env, bad), "2 <image> placeholder(s)", "1 image(s)")


@case("data", "train")
def data_more_images_than_placeholders(env: Env) -> Expect:
    bad = record(BAD, image=["img.png", "img.png"])
    return _train_err(env, _with_bad(env, bad), "1 <image> placeholder(s)", "2 image(s)")


@case("data", "train")
def data_image_without_placeholder(env: Env) -> Expect:
    return _train_err(env, _with_bad(env, record(BAD, question="What colour?")), "0 <image> placeholder(s)")


@case("data", "train")
def data_placeholder_without_image(env: Env) -> Expect:
    return _train_err(env, _with_bad(env, record(BAD, image=None)), "1 <image> placeholder(s)", "0 image(s)")


@case("data", "train")
def data_placeholder_wrong_case(env: Env) -> Expect:
    """``<Image>`` is not the placeholder: the record then has an image and no placeholder."""
    bad = record(BAD, question="<Image>\nWhat colour is the square?")
    return _train_err(env, _with_bad(env, bad), "<Image>")


@case("data", "train")
def data_placeholder_wrong_case_no_image(env: Env) -> Expect:
    """Text-only, but ``<Image>`` would silently be trained as text: refused as a misspelt placeholder."""
    bad = record(BAD, image=None, question="<IMAGE> What colour?")
    return _train_err(env, _with_bad(env, bad), "<IMAGE>")


@case("data", "train")
def data_sequence_too_long(env: Env) -> Expect:
    bad = record(BAD, answer=" ".join(["red"] * 200))
    return _train_err(env, _with_bad(env, bad), "exceeds", "never truncated", model="max_length = 48\n",
                      before_model=False)  # a length needs the model's tokenizer


@case("data", "train")
def data_sequence_too_long_skipped(env: Env) -> Expect:
    bad = record(BAD, answer=" ".join(["red"] * 200))
    return Expect(env.train(_with_bad(env, bad), skip=True, model="max_length = 48\n"), skipped=True, sample=BAD)


@case("data", "train")
def data_id_is_list(env: Env) -> Expect:
    return _train_err(env, _with_bad(env, record(["a"])), "record [1]", "'id'", sample=None)


@case("data", "train")
def data_id_is_float(env: Env) -> Expect:
    return _train_err(env, _with_bad(env, record(1.5)), "record [1]", "'id'", sample=None)


@case("data", "train")
def data_id_is_bool(env: Env) -> Expect:
    return _train_err(env, _with_bad(env, record(True)), "record [1]", "'id'", sample=None)


@case("data", "train")
def data_id_is_null(env: Env) -> Expect:
    return _train_err(env, _with_bad(env, record(None)), "record [1]", "'id'", sample=None)


@case("data", "train")
def data_id_empty_string(env: Env) -> Expect:
    return _train_err(env, _with_bad(env, record("")), "record [1]", "'id'", sample=None)


@case("data", "train")
def data_huge_number_id(env: Env) -> Expect:
    """An integer id of any size is an id; it must not overflow into a float or lose digits."""
    path = env.data_dir() / "data.json"
    records = good_records()
    path.write_text("[" + ", ".join([json.dumps(records[0]), json.dumps(record(0)).replace(
        '"id": 0', '"id": 123456789012345678901234567890123'), json.dumps(records[1])]) + "]")
    return Expect(env.train(path), ok=True)


@case("data", "eval")
def data_huge_float_in_meta(env: Env) -> Expect:
    path = env.data_dir() / "data.json"
    path.write_text("[" + json.dumps(record(BAD)).replace('"id"', '"score": 1e999, "id"') + "]")
    return _eval_err(env, path, "['score']", "finite")


@case("data", "eval")
def data_nan_answer(env: Env) -> Expect:
    path = env.data_dir() / "data.json"
    path.write_text("[" + json.dumps(record(BAD)).replace('"id"', '"answer": NaN, "id"') + "]")
    return _eval_err(env, path, "['answer']", "NaN")


@case("data", "eval")
def data_infinity_in_meta(env: Env) -> Expect:
    path = env.data_dir() / "data.jsonl"
    path.write_text(json.dumps(good_records()[0]) + "\n" + json.dumps(record(BAD)).replace(
        '"id"', '"weight": -Infinity, "id"') + "\n")
    return _eval_err(env, path, "line 2", "['weight']", "Infinity")


@case("data", "eval")
def data_answer_is_list_of_numbers(env: Env) -> Expect:
    """A meta answer the scorer cannot compare to text is refused by name, not scored as a string."""
    return _eval_err(env, _with_bad(env, record(BAD, answer_list=None) | {"answer": [1, 2]}), "answer")


@case("data", "eval")
def data_answer_is_object(env: Env) -> Expect:
    return _eval_err(env, _with_bad(env, record(BAD) | {"answer": {"text": "red"}}), "answer")


@case("data", "train")
def data_unknown_keys_accepted(env: Env) -> Expect:
    """Keys a record does not need are kept as its meta: a file from another tool trains as it is."""
    records = [r | {"source_dataset": "other", "width": 64} for r in good_records()]
    return Expect(env.train(env.write_json(records)), ok=True)


@case("data", "eval")
def data_eval_unknown_keys_accepted(env: Env) -> Expect:
    records = [r | {"source_dataset": "other"} for r in good_records(2)]
    return Expect(env.eval(env.write_json(records), extra=("--max-samples", "2")), ok=True)


@case("data", "eval")
def eval_data_missing(env: Env) -> Expect:
    path = env.root / "nope.json"
    return _eval_err(env, path, "not found", sample=None)


@case("data", "eval")
def eval_data_is_folder(env: Env) -> Expect:
    return _eval_err(env, env.data_dir(), sample=None)


@case("data", "eval")
def eval_empty_set(env: Env) -> Expect:
    return _eval_err(env, env.write_json([]), "no samples", sample=None)


@case("data", "eval")
def eval_record_without_question(env: Env) -> Expect:
    bad = record(BAD)
    bad["conversations"] = bad["conversations"][1:]
    return _eval_err(env, _with_bad(env, bad), "human")


@case("data", "train")
def data_broken_in_the_second_stage(env: Env) -> Expect:
    """A broken record in a later stage's data fails before the first stage trains (and before any model)."""
    bad = env.write_json([*good_records(), record(BAD, image=3)], "instruct.json")
    argv = env.train(env.write_json(good_records()),
                     stage=f'[[stages]]\nname = "instruct"\ndata = "{bad}"\nmax_steps = 1\nbatch_size = 2\n')
    return Expect(argv, named=(str(bad), "'image'"), sample=BAD, absent=(env.run_dir,), before_model=True)


@case("data", "train")
def data_skip_bad_record(env: Env) -> Expect:
    bad = record(BAD)
    bad["conversations"][1]["from"] = "robot"
    return Expect(env.train(_with_bad(env, bad), skip=True), skipped=True, sample=BAD)


@case("data", "train")
def data_all_records_bad_skipped(env: Env) -> Expect:
    """Skipping every record leaves nothing to train on: an error naming the file, not a silent no-op."""
    bad = [record(f"b{i}", image=3) for i in range(3)]
    path = env.write_json(bad)
    return Expect(env.train(path, skip=True), named=(str(path),), absent=env.train_leftovers(), before_model=True)


@case("data", "train")
def data_nested_too_deeply(env: Env) -> Expect:
    """JSON nested deeper than the parser recurses: refused by name, not a RecursionError."""
    path = env.data_dir() / "data.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    return _train_err(env, path, "nested", sample=None)


@case("data", "train")
def data_jsonl_line_nested_too_deeply(env: Env) -> Expect:
    lines = [json.dumps(r) for r in good_records()]
    path = env.write_jsonl([lines[0], "[" * 100_000 + "]" * 100_000, *lines[1:]])
    return _train_err(env, path, "line 2", "nested", sample=None)


@case("data", "train")
def data_file_is_an_image(env: Env) -> Expect:
    path = env.data_dir() / "data.json"
    path.write_bytes((env.data_dir() / "img.png").read_bytes())
    return _train_err(env, path, "UTF-8", sample=None)


@case("data", "train")
def data_skipped_share_over_the_bound(env: Env) -> Expect:
    """More bad records than ``max_skip_fraction`` allows stops the run before any model is built."""
    bad = record(BAD)
    bad["conversations"][1]["from"] = "robot"
    path = _with_bad(env, bad)
    argv = env.train(path, stage='on_error = "skip"\n')
    return Expect(argv, named=(str(path), "max_skip_fraction", BAD), absent=(env.run_dir,), before_model=True)
