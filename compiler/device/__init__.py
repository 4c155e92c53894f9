"""On-device helpers shipped in infc build kits."""
