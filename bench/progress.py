"""A dependency-free progress bar on stderr (redrawn in place on a terminal, a line per ~10% otherwise)."""
import sys
import time


def fmt_duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    def __init__(self, total: int, stream=None, width: int = 28):
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream or sys.stderr
        self.width = width
        self.t0 = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last_line = -1.0

    def add(self, n: int):
        self.total += n

    def step(self, label: str = "", n: int = 1):
        self.done = min(self.done + n, self.total)
        self._draw(label)

    def note(self, label: str):
        self._draw(label)

    def _draw(self, label: str):
        elapsed = time.perf_counter() - self.t0
        frac = self.done / self.total
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        bar = "#" * int(frac * self.width) + "-" * (self.width - int(frac * self.width))
        line = (f"[{bar}] {self.done}/{self.total} {fmt_duration(elapsed)} "
                f"eta {fmt_duration(eta)}  {label[:60]}")
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self.stream.flush()
        elif frac - self._last_line >= 0.1 or self.done == self.total:
            self._last_line = frac
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self):
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
