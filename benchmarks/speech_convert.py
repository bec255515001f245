"""The converted CTranslate2 Whisper against faster-whisper on the same weights and audio.

For each packaged model (tiny.en, base) and each pocketsphinx-testdata recording: the
encoder outputs of both on the same log-mel features (max absolute difference), the greedy
token ids of transformers and of CTranslate2 on those same features (equal or not), and the
corpus WER after Whisper's English normaliser of chiasm's transcripts and of faster-whisper's
own end-to-end ``transcribe`` (its own log-mel front end, greedy, no timestamps).
Prints and writes JSON (``--out``). Needs the ``speech-test`` extra (faster-whisper).

    python benchmarks/speech_convert.py --models tiny.en,base --out runs/speech/convert.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def compare(name: str, data: list) -> dict:
    import ctranslate2
    import torch
    from faster_whisper import WhisperModel

    from chiasm.speech.loader import load_whisper, packaged_ct2_folder
    from chiasm.speech.metrics import error_rates
    from chiasm.speech.tokens import decoder_prompt
    from chiasm.speech.transcribe import features, generate_ids

    t0 = time.perf_counter()
    w = load_whisper(f"packaged:{name}")
    t_load = time.perf_counter() - t0
    fw = WhisperModel(str(packaged_ct2_folder(name)), device="cpu", compute_type="float32", cpu_threads=2)
    rows, ours, theirs = [], [], []
    lang = "en" if w.model.config.vocab_size >= 51865 else None
    for s in data:
        feats = features(w, [s.load()])
        with torch.no_grad():
            enc = w.model.model.encoder(feats).last_hidden_state[0].numpy()
        ct2_enc = fw.model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(feats.numpy())))
        ct2_enc = np.array(ct2_enc)[0]
        hf_ids = generate_ids(w, feats, language=lang)[0]
        # CTranslate2's greedy search on the very same features: the model, not the front end, compared.
        prompt = decoder_prompt(w.tokenizer, lang)
        ct2_out = fw.model.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(feats.numpy())),
                                    [prompt], beam_size=1, max_length=200, suppress_blank=True, suppress_tokens=[-1])
        eot = w.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        ct2_ids = [t for t in ct2_out[0].sequences_ids[0] if t < eot]
        segs, _ = fw.transcribe(s.load(), language="en" if lang else None, beam_size=1, best_of=1, temperature=0.0,
                                without_timestamps=True, condition_on_previous_text=False, vad_filter=False)
        segs = list(segs)
        hf_text = w.tokenizer.decode(hf_ids, skip_special_tokens=True).strip()
        fw_text = " ".join(seg.text.strip() for seg in segs)
        ours.append(hf_text)
        theirs.append(fw_text)
        rows.append({"id": s.id, "encoder_max_abs_diff": float(np.abs(enc - ct2_enc).max()),
                     "tokens_equal": hf_ids == ct2_ids, "ours": hf_text, "faster_whisper": fw_text, "ref": s.text})
    refs = [s.text for s in data]
    return {"model": name, "convert_and_load_s": t_load, "clips": len(rows),
            "tokens_equal": sum(r["tokens_equal"] for r in rows),
            "encoder_max_abs_diff": max(r["encoder_max_abs_diff"] for r in rows),
            "wer_chiasm": error_rates(refs, ours, "en")["wer"],
            "wer_faster_whisper": error_rates(refs, theirs, "en")["wer"],
            "rows": rows}


def main() -> None:
    from chiasm.speech.datasets import pocketsphinx_set

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny.en,base")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    data = pocketsphinx_set().samples
    results = [compare(m, data) for m in args.models.split(",")]
    for r in results:
        print(f"{r['model']}: tokens equal {r['tokens_equal']}/{r['clips']}, encoder max |diff| "
              f"{r['encoder_max_abs_diff']:.2e}, WER chiasm {r['wer_chiasm']:.4f} vs faster-whisper "
              f"{r['wer_faster_whisper']:.4f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
