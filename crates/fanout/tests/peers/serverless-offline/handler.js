// Handlers of the serverless-offline peer service: $connect appends the new
// connection id to the file named by FANOUT_DEV_PEER_IDS, one a line.
"use strict";
const fs = require("fs");

exports.connect = async (event) => {
  fs.appendFileSync(process.env.FANOUT_DEV_PEER_IDS, event.requestContext.connectionId + "\n");
  return { statusCode: 200 };
};

exports.disconnect = async () => ({ statusCode: 200 });

exports.ignore = async () => ({ statusCode: 200 });
