// Small time-series charts (uPlot, vendored as a static file) with rule thresholds.

const HEIGHT = 56;
const LINE = "#2dd4bf";
const FILL = "rgba(45, 212, 191, 0.10)";
const THRESHOLD = "rgba(248, 81, 73, 0.75)";
const POINT = 5; // a reading with none beside it, drawn as a dot
// Readings further apart than this many times a series' usual interval (its median
// step): an outage, across which no line is drawn.
const GAP_FACTOR = 5;

function paddedRange(_plot, min, max) {
  if (min === null || max === null) return [0, 1];
  const pad = Math.max(0.5, (max - min) * 0.15);
  return [min - pad, max + pad];
}

// A series' readings (the times at which it has a value), with a null between two much
// further apart than usual: uPlot draws no line across a null. An outage was drawn as a
// straight line from the last reading before it to the first after.
export function withGaps(times, values) {
  const xs = [];
  const ys = [];
  times.forEach((t, i) => {
    if (values[i] === null || values[i] === undefined) return;
    xs.push(t);
    ys.push(values[i]);
  });
  const steps = xs.slice(1).map((t, i) => t - xs[i]).filter((step) => step > 0);
  steps.sort((a, b) => a - b);
  const usual = steps[Math.floor((steps.length - 1) / 2)]; // the lower median
  if (!(usual > 0)) return [xs, ys];
  const gapped = [[], []];
  xs.forEach((t, i) => {
    if (i > 0 && t - xs[i - 1] > GAP_FACTOR * usual) {
      gapped[0].push((xs[i - 1] + t) / 2);
      gapped[1].push(null);
    }
    gapped[0].push(t);
    gapped[1].push(ys[i]);
  });
  return gapped;
}

// The readings with no reading on either side (a device's only one, one alone between
// gaps), which a line cannot show: drawn as dots. A single reading drew nothing.
function lonePoints(plot, seriesIdx) {
  const values = plot.data[seriesIdx];
  const lone = [];
  for (let i = 0; i < values.length; i++) {
    if (values[i] !== null && values[i - 1] == null && values[i + 1] == null) lone.push(i);
  }
  return lone.length ? lone : null;
}

export class Sparkline {
  constructor(element) {
    this.element = element;
    this.thresholds = [];
    const options = {
      width: Math.max(120, element.clientWidth || 200),
      height: HEIGHT,
      pxAlign: false,
      legend: { show: false },
      cursor: { show: false },
      select: { show: false },
      scales: { x: { time: true }, y: { range: paddedRange } },
      axes: [{ show: false }, { show: false }],
      series: [
        {},
        {
          stroke: LINE,
          width: 1.5,
          fill: FILL,
          points: { show: false, size: POINT, fill: LINE, stroke: LINE, filter: lonePoints },
        },
      ],
      hooks: { draw: [(plot) => this.drawThresholds(plot)] },
    };
    this.plot = new window.uPlot(options, [[], []], element);
  }

  setData(times, values, thresholds) {
    this.thresholds = thresholds;
    this.plot.setData([times, values]);
  }

  resize() {
    const width = Math.max(120, this.element.clientWidth);
    if (width !== this.plot.width) this.plot.setSize({ width, height: HEIGHT });
  }

  drawThresholds(plot) {
    const { ctx, bbox } = plot;
    for (const value of this.thresholds) {
      const y = plot.valToPos(value, "y", true);
      if (!(y >= bbox.top && y <= bbox.top + bbox.height)) continue;
      ctx.save();
      ctx.strokeStyle = THRESHOLD;
      ctx.lineWidth = 1;
      ctx.setLineDash([4, 3]);
      ctx.beginPath();
      ctx.moveTo(bbox.left, y);
      ctx.lineTo(bbox.left + bbox.width, y);
      ctx.stroke();
      ctx.restore();
    }
  }
}
