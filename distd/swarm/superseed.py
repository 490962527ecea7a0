"""Seeder-side policy: hand each chunk out once before handing any out twice.

When every node of a repave asks the seeder at once, a seeder that serves whatever
is asked sends popular chunks many times and the swarm waits on it. Instead, a
chunk handed out recently is deferred ("get it from your peers"): the node that
got it passes it on, and the seeder's upload goes to chunks the swarm lacks. After
`window` seconds a chunk may be handed out again, so a recipient that died on the
way costs the swarm one window, never the chunk.
"""

from __future__ import annotations


class SuperSeeder:
    def __init__(self, window: float = 8.0) -> None:
        self.window = window
        self.last_served: dict[str, float] = {}
        self.deferred = 0

    def admit(self, digest: str, now: float) -> bool:
        """True to serve `digest` now; False to defer the asker to its peers."""
        last = self.last_served.get(digest)
        if last is not None and now - last < self.window:
            self.deferred += 1
            return False
        self.last_served[digest] = now
        return True

    def abandoned(self, digest: str) -> None:
        """A transfer admitted for `digest` failed: let the next asker have it at once."""
        self.last_served.pop(digest, None)
