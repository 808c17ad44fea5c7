"""The fisedit-ray editing service on Ray Serve, installed as `fisedit_ray.deployments`.

Imports go one way: deployments -> fisedit_ray -> kernels. The engine knows nothing of Ray.
"""
