"""`python -m sinkscope.webapp.serve run SCRIPT [streamlit options]`: `streamlit run`, with the modules the app's
first render needs (sinkscope's trace reader, analysis and figures: pandas, pyarrow, safetensors, pydantic,
plotly) imported before the server starts rather than during the first visitor's first render. The Streamlit
pages themselves (`sinkscope.webapp`) are not imported here: their caches belong to the running server."""

from streamlit.web.cli import main

import sinkscope.analysis  # noqa: F401
import sinkscope.trace  # noqa: F401
import sinkscope.viz  # noqa: F401

if __name__ == "__main__":
    main(prog_name="streamlit")
