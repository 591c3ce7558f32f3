"""The studies' protocols, one module each: what runs, in which order, and how it is judged."""
