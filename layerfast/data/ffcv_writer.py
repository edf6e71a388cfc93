"""FFCV 1.0.2's `DatasetWriter`, minus its one way to hang forever.

FFCV's writer starts worker processes and then polls a shared counter until every sample is
written. A worker that dies (an exception in a sample, a full disk or /dev/shm, the OOM
killer) never bumps the counter, and the writer waits forever -- in CI, until the job times
out. `SafeDatasetWriter._write_common` is FFCV's loop, unchanged except that it checks the
workers' exit codes while waiting and raises (after stopping the rest) when one failed.
When it gives up, it also cancels the work queue's join: the chunks the dead workers never
read would otherwise keep the queue's feeder thread blocked on a full pipe, and interpreter
exit (which joins that thread) would hang instead. `finalize` is FFCV's minus a bare
`except:` that turned a Ctrl-C or SIGTERM arriving there into an empty allocation table --
a .beton without image data, reported as written.
"""

from __future__ import annotations

import ctypes
import os
import time
from multiprocessing import Process, Queue, Value
from typing import Any

import numpy as np
from ffcv.memory_allocator import MemoryAllocator
from ffcv.types import ALLOC_TABLE_TYPE
from ffcv.writer import DatasetWriter
from tqdm import tqdm

from layerfast.errors import LayerfastError


class SafeDatasetWriter(DatasetWriter):
    def _write_common(self, num_samples: int, queue_content: Any, work_fn: Any,
                      extra_worker_args: tuple) -> None:  # fmt: skip
        self.num_samples = num_samples
        self.prepare()
        workqueue: Queue = Queue()
        allocations_queue: Queue = Queue()
        processes: list[Process] = []
        previous = 0
        try:
            for todo in queue_content:
                workqueue.put(todo)
            for _ in range(self.num_workers):
                workqueue.put(None)
            done_number = Value(ctypes.c_uint64, 0)
            allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
            worker_args = (workqueue, self.metadata_sm, self.metadata_type, self.fields,
                           allocator, done_number, allocations_queue, *extra_worker_args)  # fmt: skip
            processes += [Process(target=work_fn, args=worker_args)
                          for _ in range(self.num_workers)]  # fmt: skip
            for p in processes:
                p.start()
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
            if previous != num_samples:  # chunks left unread: do not let exit wait on them
                workqueue.cancel_join_thread()
            for p in processes:
                if p.is_alive() and p.exitcode is None and previous != num_samples:
                    p.terminate()
                p.join(timeout=60)
            self.metadata_sm.close()
            self.metadata_sm.unlink()

    def finalize(self, allocations: list) -> None:
        """FFCV's `finalize` (sample metadata, allocation table, header), without the bare
        `except:` around the table that swallowed KeyboardInterrupt and SystemExit."""
        table = np.array([tuple(a) for a in allocations if len(a)], dtype=ALLOC_TABLE_TYPE)
        with open(self.fname, "r+b") as fp:
            fp.seek(self.metadata_start)
            fp.write(self.metadata_sm.buf)
            fp.seek(0, os.SEEK_END)
            self.header["alloc_table_ptr"] = fp.tell()
            fp.write(table.tobytes())
            fp.seek(0)
            fp.write(self.header.tobytes())
