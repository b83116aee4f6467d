"""Sharing the daemon between its clients: the queue of complete requests in front of
the workers, and the budget of request bytes held in memory.

FairQueue keeps one line per key (the SMTP client's address, else the calling user,
else the peer) and gives a free worker the oldest request of the key with the fewest
requests in work: one local user or one remote sender sending many big messages at
once gets the workers the others leave free, and a newcomer is served next. When more
requests wait than FP_SCAND_QUEUE allows, the newest request of the key with the
longest line is dropped (answered busy): a flood from one key makes that key wait,
not the others.
"""

import collections
import itertools
import threading


class FairQueue:
    def __init__(self):
        self._cond = threading.Condition()
        self._lines = {}                       # key -> deque of (seq, job), oldest first
        self._active = collections.Counter()   # key -> jobs in work
        self._waiting = 0
        self._idle = 0                         # workers blocked in take()
        self._seq = itertools.count()
        self._closed = False

    def put(self, job, capacity):
        """Queue job (a job has .key); return the job dropped to keep at most capacity
        jobs waiting beyond the idle workers (it may be job itself), or None."""
        with self._cond:
            self._lines.setdefault(job.key, collections.deque()).append((next(self._seq), job))
            self._waiting += 1
            dropped = None
            if self._waiting - self._idle > capacity:
                key = max(self._lines, key=lambda k: (len(self._lines[k]), self._active[k], k == job.key))
                dropped = self._pop(key, newest=True)
            if dropped is not job:
                self._cond.notify()
            return dropped

    def full(self, capacity):
        """Whether a new job would be dropped right now (no worker idle, no room)."""
        with self._cond:
            return self._waiting + 1 - self._idle > capacity

    def take(self):
        """The next job for a worker (blocks); None once closed. The worker calls
        done(job) when it has finished with it."""
        with self._cond:
            self._idle += 1
            while not self._waiting and not self._closed:
                self._cond.wait()
            self._idle -= 1
            if not self._waiting:
                return None
            key = min(self._lines, key=lambda k: (self._active[k], self._lines[k][0][0]))
            job = self._pop(key, newest=False)
            self._active[key] += 1
            return job

    def done(self, job):
        with self._cond:
            self._active[job.key] -= 1
            if not self._active[job.key]:
                del self._active[job.key]

    def remove(self, job):
        """Take a job that waits out of the queue (its time ran out); False if a worker
        has it already."""
        with self._cond:
            line = self._lines.get(job.key, ())
            for entry in line:
                if entry[1] is job:
                    line.remove(entry)
                    self._waiting -= 1
                    if not line:
                        del self._lines[job.key]
                    return True
            return False

    def close(self):
        """Wake every worker for good: take() returns None once nothing waits."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _pop(self, key, newest):
        line = self._lines[key]
        _, job = line.pop() if newest else line.popleft()
        self._waiting -= 1
        if not line:
            del self._lines[key]
        return job


class Budget:
    """Bytes of requests held in memory at once (heads being read, envelopes), over all
    connections; FP_SCAND_REQUEST_MEMORY."""

    def __init__(self, limit):
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._lock = threading.Lock()

    def take(self, size) -> bool:
        with self._lock:
            if self.used + size > self.limit:
                return False
            self.used += size
            self.peak = max(self.peak, self.used)
            return True

    def give(self, size):
        with self._lock:
            self.used -= size
