"""Per step, where a method's time goes: the student's forward, the teacher's logits from the head, the
projections, the discriminator, Soft-DTW, ALM, prefix-kd, the backward, the optimizer, the loader.

Each method runs from the same store, batches and student init in its own fresh process, through the product's
own stage (`dskd_pipe.distill`): 1 + --steps steps timed as the stage logs them (`step_s` in metrics.jsonl, the
median, the first step left out), then --steps steps again under cProfile, whose cumulative
times per function split the step. The profiler slows Python-heavy parts, so the split is read as shares of the
profiled step and scaled to the unprofiled one. The backward runs in C++ and is one part ("backward": every term's
gradient together); parts inside the loss overlap where one calls another (cma includes its projections), so
they are listed under "inside the loss", not summed.

The floor: no distillation step of this student is cheaper than `sft` (the student's forward, CE, backward and
AdamW); `excess_over_sft_s` is what each method adds to it.

    python bench/step_breakdown.py            # the bench/whole_runs.py CPU pair, 4 x <= 160 tokens, 3 steps
Writes bench/results/step_breakdown-<device>-<teacher>_<student>.json.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import whole_runs  # noqa: E402  (the CPU shapes)
import distill_offline_vs_online as dovo  # noqa: E402
from results_file import write_result  # noqa: E402

METHODS = "sft,kd,uld,dskd-cma,cma-ga,dwa-kd,alm+prefix-kd"
SAME_VOCAB = {"kd", "dskd", "dskd-v2"}
# part -> functions (file suffix, name) whose cumulative time it is
TOP = {
    "loader": [("torch/utils/data/dataloader.py", "__next__")],
    "student_forward": [("pipeline/student.py", "student_forward")],
    "teacher_forward": [("pipeline/teacher.py", "hidden")],  # online only; offline the rows come with the batch
    "loss": [("pipeline/step.py", "micro_batch_loss")],  # includes the two above; subtracted below
    "backward": [("torch/_tensor.py", "backward")],
    "optimizer": [("torch/optim/optimizer.py", "wrapper"), ("torch/nn/utils/clip_grad.py", "_clip_grads_with_norm_"),
                  ("torch/nn/utils/clip_grad.py", "_get_total_norm")],
}
INSIDE_LOSS = {
    "teacher_logits_from_head": [("objectives/dskd.py", "teacher_logits")],
    "chunked_kl_over_head": [("objectives/dskd.py", "chunked_fkl_over_head"),
                             ("objectives/dwa.py", "chunked_fkl_rows_over_head")],
    "projections": [("objectives/dskd.py", "_apply")],
    "cross_model_attention": [("objectives/dskd.py", "cross_model_attention")],
    "discriminator": [("objectives/cma_ga.py", "discriminator_loss"), ("objectives/cma_ga.py", "generator_loss")],
    "soft_dtw": [("objectives/dwa.py", "normalized_soft_dtw")],
    "alm": [("objectives/alm.py", "alm_loss")],
    "prefix_kd": [("objectives/prefix_kd.py", "prefix_kd_loss")],
    "uld": [("objectives/baselines.py", "uld_loss")],
    "student_ce": [("objectives/divergences.py", "cross_entropy_sum")],
    "sort": [("~", "<method 'sort' of 'torch._C.TensorBase' objects>")],
}


def cumulative(stats: dict, funcs) -> float:
    return sum(ct for (file, _, name), (_, _, _, ct, _) in stats.items()
               if any(name == f and file.endswith(s) for s, f in funcs))


def one_method(spec: dict) -> dict:
    """In a fresh process: warm-up run, timed run, profiled run of one method; the split per step."""
    import dskd_pipe as dp

    common = dict(student=spec["student"], method=spec["method"], data=spec["data"], cache=spec["store"],
                  max_length=spec["max_length"], micro_batch_size=spec["micro_batch_size"], grad_accum=1,
                  epochs=1000, device=spec["device"], num_workers=0, progress=False, seed=0, quiet=True)
    work = Path(spec["work"])
    timed = dp.distill(out=str(work / "timed"), max_steps=spec["steps"] + 1, **common)
    rows = [json.loads(ln) for ln in (timed / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    step_s = statistics.median(r["step_s"] for r in rows[1:])  # the first step: lazy set-up, left out
    prof = cProfile.Profile()
    prof.enable()
    profiled = dp.distill(out=str(work / "profiled"), max_steps=spec["steps"], **common)
    prof.disable()
    prow = [json.loads(ln) for ln in (profiled / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    stats = pstats.Stats(prof).stats
    n = spec["steps"]
    top = {k: cumulative(stats, v) / n for k, v in TOP.items()}
    top["loss"] -= top["student_forward"] + top["teacher_forward"]
    step_profiled = sum(r["step_s"] for r in prow) / n
    top["other"] = step_profiled - sum(top.values())
    inside = {k: cumulative(stats, v) / n for k, v in INSIDE_LOSS.items()}
    scale = step_s / step_profiled  # the profiled split, scaled to the unprofiled step
    return {"step_s": step_s, "step_s_profiled": step_profiled, "final_loss": rows[-1]["loss"],
            "parts_s": {k: round(v * scale, 4) for k, v in top.items()},
            "inside_loss_s": {k: round(v * scale, 4) for k, v in inside.items() if v > 0}}


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["one"]:
        Path(argv[2]).write_text(json.dumps(one_method(json.loads(argv[1]))))
        return {}
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher-shape", default="cpu-qwen2-51m", choices=sorted(dovo.SHAPES))
    p.add_argument("--same-vocab-teacher-shape", default="tiny-gpt2", choices=sorted(dovo.SHAPES),
                   help="The teacher of the same-vocabulary methods (kd): GPT-2's tokenizer.")
    p.add_argument("--student-shape", default="cpu-gpt2-3m", choices=sorted(dovo.SHAPES))
    p.add_argument("--methods", default=METHODS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--limit", type=int, default=16)
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--same-process", action="store_true", help="Every method in this process (a smoke test; the "
                   "figures want a fresh process per method).")
    p.add_argument("--work", default="")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    methods = args.methods.split(",")

    import torch
    from transformers import AutoTokenizer

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        student = dovo.build_model(args.student_shape, work / "student")
        teachers = {"cross": dovo.build_model(args.teacher_shape, work / "teacher")}
        if SAME_VOCAB & set(methods):
            teachers["same"] = dovo.build_model(args.same_vocab_teacher_shape, work / "teacher-same")
        toks = [AutoTokenizer.from_pretrained(t) for t in (*teachers.values(), student)]
        rows = whole_runs.fitting_examples(dovo.DATA, toks, args.max_length, args.limit)
        data = work / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        dtype = "float32" if args.device == "cpu" else "bfloat16"
        stores = {}
        for pair, teacher in teachers.items():
            stores[pair] = work / f"store-{pair}"
            if not stores[pair].exists():
                import dskd_pipe as dp

                dp.cache_teacher(teacher=str(teacher), data=str(data), out=str(stores[pair]),
                                 max_length=args.max_length, device=args.device, dtype=dtype, progress=False,
                                 quiet=True)
        for method in methods:
            pair = "same" if method in SAME_VOCAB else "cross"
            folder = work / method.replace("+", "_")
            spec = dict(student=str(student), method=method, data=str(data), store=str(stores[pair]),
                        max_length=args.max_length, micro_batch_size=args.micro_batch_size, steps=args.steps,
                        device=args.device, work=str(folder))
            out = folder / "result.json"
            folder.mkdir(parents=True, exist_ok=True)
            if args.same_process:
                out.write_text(json.dumps(one_method(spec)))
            else:
                proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "one", json.dumps(spec),
                                       str(out)], capture_output=True, text=True,
                                      env={**os.environ, "TQDM_DISABLE": "1"})
                if proc.returncode != 0:
                    sys.exit(f"{method} failed:\n{proc.stderr[-4000:]}")
            results[method] = {"pair": pair, **json.loads(out.read_text())}
            print(f"{method}: {results[method]['step_s']:.3f} s/step {results[method]['parts_s']}", file=sys.stderr)
    if "sft" in results:
        for r in results.values():
            r["over_sft"] = round(r["step_s"] / results["sft"]["step_s"], 2)
            r["excess_over_sft_s"] = round(r["step_s"] - results["sft"]["step_s"], 4)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {os.cpu_count()} cores"
    result = {"device": device, "args": vars(args), "examples": len(rows), "methods": results,
              "load_average_at_end": os.getloadavg()}
    write_result(args.out, f"step_breakdown-{args.device.split(':')[0]}-{args.teacher_shape}_{args.student_shape}",
                 result)
    return result


if __name__ == "__main__":
    main()
