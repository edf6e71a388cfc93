"""FFCV 1.0.2's `DatasetWriter`, minus its one way to hang forever.

FFCV's writer starts worker processes and then polls a shared counter until every sample is
written. A worker that dies (an exception in a sample, a full disk or /dev/shm, the OOM
killer) never bumps the counter, and the writer waits forever -- in CI, until the job times
out. `SafeDatasetWriter._write_common` is FFCV's loop, unchanged except that it checks the
workers' exit codes while waiting and raises (after stopping the rest) when one failed.
"""

from __future__ import annotations

import ctypes
import time
from multiprocessing import Process, Queue, Value
from typing import Any

from ffcv.memory_allocator import MemoryAllocator
from ffcv.writer import DatasetWriter
from tqdm import tqdm

from layerfast.errors import LayerfastError


class SafeDatasetWriter(DatasetWriter):
    def _write_common(self, num_samples: int, queue_content: Any, work_fn: Any,
                      extra_worker_args: tuple) -> None:  # fmt: skip
        self.num_samples = num_samples
        self.prepare()
        workqueue: Queue = Queue()
        for todo in queue_content:
            workqueue.put(todo)
        allocations_queue: Queue = Queue()
        for _ in range(self.num_workers):
            workqueue.put(None)
        done_number = Value(ctypes.c_uint64, 0)
        allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
        worker_args = (workqueue, self.metadata_sm, self.metadata_type, self.fields, allocator,
                       done_number, allocations_queue, *extra_worker_args)  # fmt: skip
        processes = [Process(target=work_fn, args=worker_args) for _ in range(self.num_workers)]
        for p in processes:
            p.start()
        previous = 0
        try:
            with tqdm(total=num_samples, desc="convert", disable=None) as progress:
                while previous != num_samples:
                    failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
                    if failed:
                        raise LayerfastError(
                            f"convert: an FFCV writer process failed (exit code {failed[0]}); "
                            "its error is printed above"
                        )
                    val = done_number.value
                    progress.update(val - previous)
                    previous = val
                    time.sleep(0.05)
            allocation_list = []
            for _ in processes:
                allocation_list.extend(allocations_queue.get(timeout=600))
            self.finalize(allocation_list)
        finally:
            for p in processes:
                if p.is_alive() and p.exitcode is None and previous != num_samples:
                    p.terminate()
                p.join(timeout=60)
            self.metadata_sm.close()
            self.metadata_sm.unlink()
