"""bench/distributed.py at its smallest real path: its arguments, the student and store it builds, and the
one-process `dskd-pipe distill` it times (DDP and FSDP2 under torchrun with 2+ processes are the bench's own run:
tests/stages/test_distill_torchrun.py covers those engines)."""


def test_one_process_run_is_measured(bench, tmp_path):
    module = bench("distributed")
    args = module.parse_args(["--student-size", "tiny", "--nproc", "2", "--micro-batch-size", "1", "--max-length",
                              "48", "--warmup", "0", "--steps", "1"])
    assert args.limit == 2  # micro-batch x accumulation x processes x steps: one global batch per step
    # Llama's 32k vocabulary: a store and teacher head a fifth of Qwen's
    student, store = module.build(tmp_path, args.student_size, args.limit, args.max_length, teacher_tokenizer="llama2")
    run = module.run_one("one", 1, False, args, student, store, tmp_path)
    assert run["engine"] == "none" and run["grad_accum"] == 2 and run["global_batch"] == 2
    assert run["tokens_per_s"] > 0 and len(run["losses"]) == 1 and run["peak_rss_gib_largest_process"] > 0
