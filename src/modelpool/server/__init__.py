"""The model server: the Open Inference Protocol (KServe v2 REST) over aiohttp."""
