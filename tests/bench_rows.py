"""Rows of the monitor-overhead section of a results file, with known timings (the tests of
`optiscope.bench`'s ratios and of its README tables share them)."""


def overhead_row(impl, every, block, times, *, log_dir=False, memory=1_900_000,
                  params=124_439_808, backend="torch", workload="GPT-2 small", control=False):
    bundled = impl.startswith("optiscope")
    row = dict(workload=workload, params=params, tensors=148, param_bytes=4 * params,
               implementation=impl, label=impl, bundled=bundled,
               backend=backend if bundled else None, every=every, log_dir=log_dir,
               control=control,
               block_steps=block, blocks=len(times), steps=len(times) * block, times_ms=times)
    if every is not None:
        row.update(periods=row["steps"] // every, sampled_steps=row["steps"] // every,
                   blocks_per_period=max(1, every // block), memory_bytes=memory)
    return row


def overhead_rows(backend="torch"):
    impl = f"optiscope-adamw-{backend}"
    return [
        overhead_row(impl, None, 1, [100.0, 100.0, 100.0], backend=backend),
        overhead_row(impl, None, 10, [1000.0] * 9 + [1900.0], backend=backend),
        overhead_row(impl, None, 10, [1010.0] * 10, backend=backend, control=True),  # 1.01×
        overhead_row(impl, 1, 1, [140.0, 140.0, 1400.0], backend=backend),    # 1.4×
        overhead_row(impl, 1, 1, [160.0] * 3, log_dir=True, backend=backend),  # 1.6×
        # paired with the reference's blocks: 1.04, 1.08 (4 times each), 1.06, 2014 / 1900
        overhead_row(impl, 10, 10, [1040.0, 1080.0] * 4 + [1060.0, 2014.0],
                      backend=backend),                                        # 1.06×
        overhead_row(impl, 100, 10, [1100.0] * 10, backend=backend),          # 1.1×: one split
                                                                               # period
        overhead_row("torch-adamw-fused", None, 1, [50.0]),
        overhead_row("torch-adamw-fused", 1, 1, [400.0], memory=6_000_000),   # 8×, 1.2 %
    ]
