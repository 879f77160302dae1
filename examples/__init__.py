"""The example configs, installed with the package: `modecotd run quickstart` runs one by name, and
`modecotd examples NAME --to DIR` writes one out to edit."""
