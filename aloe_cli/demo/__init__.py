"""The demo's synthetic world: a task the tiny model learns on a CPU, its pictures, and the rules that grade it."""
