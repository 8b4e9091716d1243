"""`make demo` (`python -m demo`) and the embedded demo peer (`python -m demo.peer`): outside
the product package, built on the product's engine. Run from the project root."""
