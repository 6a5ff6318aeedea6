# cos-lab dashboard as a Hugging Face Docker Space: serves `streamlit run app.py` on port 7860 over cached_runs/.
# CPU only, and without torch/diffusers (the package's default dependencies leave them out; the Live page then says
# how to enable itself). Build and try locally:  docker build -t cos-lab . && docker run --rm -p 7860:7860 cos-lab
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    STREAMLIT_BROWSER_GATHER_USAGE_STATS=false \
    STREAMLIT_SERVER_HEADLESS=true \
    COS_RUNS_DIR=/home/user/app/cached_runs

# Spaces run the container as uid 1000; give it a home so Streamlit can write its config and caches there.
# The app folder is created here, owned by that user: pip writes the package's egg-info next to its source.
RUN useradd --create-home --uid 1000 user && mkdir /home/user/app && chown user:user /home/user/app
USER user
ENV HOME=/home/user PATH=/home/user/.local/bin:$PATH
WORKDIR /home/user/app

# The package first (its dependencies are the slow layer), then the app and the shipped runs.
COPY --chown=user pyproject.toml README.md ./
COPY --chown=user cos_core ./cos_core
RUN pip install --user --no-cache-dir . \
    && python -c "import importlib.util as u; assert u.find_spec('torch') is None, 'torch must not be in the image'"
# app.py, views/ and cached_runs/ (whatever .dockerignore lets through; a checkout without runs still starts and
# says how to make them)
COPY --chown=user . ./

EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s \
    CMD python -c "import urllib.request as r; r.urlopen('http://127.0.0.1:7860/_stcore/health', timeout=4)"
CMD ["streamlit", "run", "app.py", "--server.port", "7860", "--server.address", "0.0.0.0", \
     "--server.fileWatcherType", "none"]
