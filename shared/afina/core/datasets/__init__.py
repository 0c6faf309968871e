"""Dataset layout in the store and the checks every service agrees on."""
