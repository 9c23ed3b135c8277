# Generated from bundles/template/scripts/__init__.py by scripts/generate_bundles.py: edit those, not this file.
