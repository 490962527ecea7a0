"""Seeder-side policy: hand each chunk of an image out once before handing any out twice.

When every node of a repave asks the seeder at once, a seeder that serves whatever
is asked sends popular chunks many times and the swarm waits on it. Instead, while
an image still has chunks the seeder never handed out, a chunk it did hand out is
deferred ("get it from your peers"): the node that got it passes it on, and the
seeder's upload goes to chunks the swarm lacks. Once every chunk of the image is
out, a chunk may go out again when `window` seconds passed since its last copy;
and any chunk may go out again after `lost_after` seconds, so a recipient that
died on the way costs the swarm that long, never the chunk.

Askers name the image and its chunk count (a hint: a wrong one only costs the
asker deferrals). Without it, only the `window` rule applies.
"""

from __future__ import annotations


class SuperSeeder:
    def __init__(self, window: float = 2.0, lost_after: float = 30.0) -> None:
        self.window = window
        self.lost_after = lost_after
        self.last_served: dict[str, float] = {}
        self.out: dict[str, set[str]] = {}  # image -> chunk digests handed out
        self.deferred = 0

    def admit(self, digest: str, now: float, image: str = "", total: int = 0) -> bool:
        """True to serve `digest` now; False to defer the asker to its peers."""
        last = self.last_served.get(digest)
        if last is not None:
            out = self.out.get(image, set()) if image else set()
            still_injecting = image and total > 0 and len(out) < total
            hold = self.lost_after if still_injecting else self.window
            if now - last < hold:
                self.deferred += 1
                return False
        self.last_served[digest] = now
        if image:
            self.out.setdefault(image, set()).add(digest)
        return True

    def abandoned(self, digest: str) -> None:
        """A transfer admitted for `digest` failed: let the next asker have it at once."""
        self.last_served.pop(digest, None)
        for out in self.out.values():
            out.discard(digest)
